"""``llmos top`` and the shell's ``top``: a view of the kernel's processes, batches, KV use and tok/s.

One frame is a pure function of a ``metrics`` reply (and the previous one, for rates), so it is tested
without a kernel; ``run_top`` refreshes it in place with rich's Live when rich is installed and stdout
is a terminal, and otherwise prints one frame after another.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from llmos.types import ProcessInfo

FIRST_SAMPLE_S = 0.5  # the most the first frame waits to measure tok/s
STATE_ORDER = {"RUNNING": 0, "READY": 1, "BLOCKED": 2, "STOPPED": 3, "NEW": 4, "ZOMBIE": 5}


@dataclass(frozen=True)
class Sample:
    """One metrics reply and the monotonic time (seconds) it was taken."""

    at: float
    metrics: dict[str, Any]


OWNER_MAX = 32  # widest OWNER column; a longer name is cut with a '+'


def format_ps(procs: list[ProcessInfo]) -> str:
    """The process table of ``ps`` and ``top``: NI is the nice value, IN/OUT tokens, KV the blocks held on
    the device, PRE the preemptions, S a ``*`` for a session."""
    w = min(OWNER_MAX, max([10, *(len(p.owner) for p in procs)]))  # as wide as the names, up to OWNER_MAX
    lines = [f"{'PID':>6}  {'STATE':<8} {'NI':>3} {'OWNER':<{w}} {'IN':>6} {'OUT':>6} {'KV':>5} {'PRE':>3} S  MODEL"]
    for p in procs:
        owner = p.owner if len(p.owner) <= w else p.owner[:w - 1] + "+"  # cut as ps(1) cuts: a '+' says so
        lines.append(f"{p.pid:>6}  {p.state:<8} {p.priority:>3} {owner:<{w}} {p.prompt_tokens:>6} "
                     f"{p.output_tokens:>6} {p.kv_blocks:>5} {p.preemptions:>3} {'*' if p.session else ' '}  "
                     f"{p.model}")
    return "\n".join(lines)


def _key(ex: dict[str, Any]) -> str:
    return str(ex.get("executor") or ex.get("worker_pid") or ex.get("model"))


def model_rates(now: Sample, prev: Sample | None, procs: list[ProcessInfo]) -> dict[str, float]:
    """Tokens per second per model instance: generated tokens between two samples; on the first frame,
    the sum of 1/tpot_s of its running processes (their current decoding speed)."""
    rates: dict[str, float] = {}
    before = {_key(ex): ex for ex in (prev.metrics.get("models") or [])} if prev else {}
    for ex in now.metrics.get("models") or []:
        old = before.get(_key(ex))
        if prev is not None and old is not None and now.at > prev.at:
            rates[_key(ex)] = max(0, ex.get("tokens_out", 0) - old.get("tokens_out", 0)) / (now.at - prev.at)
        else:
            rates[_key(ex)] = sum(1.0 / p.stats["tpot_s"] for p in procs
                                  if p.model == ex.get("model") and p.state == "RUNNING" and p.stats.get("tpot_s"))
    return rates


def frame(now: Sample, prev: Sample | None = None, clock: Callable[[], float] = time.time) -> str:
    """One screen of ``top`` as text: a summary line, one line per model instance, then the processes."""
    m = now.metrics
    procs = sorted((ProcessInfo.from_wire(p) for p in m.get("processes") or []),
                   key=lambda p: (STATE_ORDER.get(p.state, 9), p.priority, p.pid))
    rates = model_rates(now, prev, procs)
    counts = ", ".join(f"{k.lower()} {v}" for k, v in (m.get("counts") or {}).items() if v) or "none"
    fin = m.get("finished") or {}
    lines = [f"llmos top - {time.strftime('%H:%M:%S', time.localtime(clock()))}   processes: {counts}   "
             f"finished: {fin.get('count', 0)}   tok/s: {sum(rates.values()):.1f}"]
    lines.append(f"{'MODEL':<40} {'BATCH':>5} {'MEAN':>5} {'MAX':>4} {'KV USED/TOTAL':>14} {'KV%':>6} "
                 f"{'PREEMPT':>7} {'TOK/S':>8}")
    for ex in m.get("models") or []:
        used, total = ex.get("kv_used", 0), ex.get("kv_total", 0)
        pct = f"{100 * used / total:.1f}%" if total else "-"
        lines.append(f"{str(ex.get('model', ''))[-40:]:<40} {ex.get('batch_last', 0):>5} "
                     f"{ex.get('batch_mean', 0.0):>5.1f} {ex.get('batch_max', 0):>4} {f'{used}/{total}':>14} "
                     f"{pct:>6} {ex.get('preemptions', 0):>7} {rates.get(_key(ex), 0.0):>8.1f}")
    if not m.get("models"):
        lines.append("(no model loaded)")
    lines += ["", format_ps(procs)]
    if m.get("omitted"):
        lines.append(f"({m['omitted']} more processes left out)")
    return "\n".join(lines)


def run_top(fetch: Callable[[], dict[str, Any]], iterations: int | None, delay: float,
            out: TextIO | None = None, *, clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep) -> None:
    """Show ``iterations`` frames (None: until Ctrl-C), ``delay`` seconds apart, of what ``fetch`` (a
    metrics call) returns; tok/s is measured between samples, the first against one taken up to
    FIRST_SAMPLE_S before it. In place (rich Live) on a terminal when rich is installed; else one after another."""
    out = out or sys.stdout
    live = None
    if out.isatty():
        try:
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text
        except ImportError:
            pass
        else:
            live = Live(console=Console(file=out), auto_refresh=False, screen=False)
    # a first sample a moment before the first frame, so that even one frame (-n 1) shows measured tok/s
    prev: Sample | None = Sample(clock(), fetch())
    sleep(min(delay, FIRST_SAMPLE_S))
    shown = 0
    with live if live is not None else contextlib.nullcontext():
        while iterations is None or shown < iterations:
            if shown:
                sleep(delay)  # the refresh period the user asked for, not a synchronisation
            now = Sample(clock(), fetch())
            text = frame(now, prev)
            if live is not None:
                live.update(Text(text), refresh=True)
            else:
                if out.isatty():
                    out.write("\x1b[H\x1b[2J")  # clear the screen: a plain terminal without rich
                elif shown:
                    out.write("\n")
                out.write(text + "\n")
                out.flush()
            prev, shown = now, shown + 1

