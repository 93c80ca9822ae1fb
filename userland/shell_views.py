"""What the shell shows as text: devices, metrics, the store's models, and model output made safe for a terminal.

Pure functions of the kernel's replies (``devices``, ``metrics``, ``models``), tested without a kernel.
"""

from __future__ import annotations

import re
from typing import Any

# C0 controls but tab and newline, DEL, and C1 controls: a model's output could otherwise move the cursor,
# clear the screen or set the window title (ESC sequences) of the terminal that shows it
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` as a terminal should show model output: control characters (ESC, CR, BEL...) written as
    ``\\xNN``, tab and newline kept."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _mib(n: Any) -> str:
    return f"{(n or 0) / 2**20:,.0f} MiB"


def format_devices(devices: list[dict[str, Any]]) -> str:
    """The ``devices`` reply as a table: one row per device (memory in MiB: total, free, held by loaded models)
    and, under it, which model instance holds how much."""
    lines = [f"{'DEVICE':<12} {'KIND':<4} {'MEMORY':>12} {'AVAILABLE':>12} {'MODELS HOLD':>12} {'BUDGET':>12}  LOAD"]
    for d in devices:
        if d.get("kind") == "node":  # a Ray node: Ray's logical resources (what placement counts)
            load = (f"{d.get('cpus_free', 0):g}/{d.get('cpus', 0):g} CPU free, {d.get('gpus_free', 0):g}/"
                    f"{d.get('gpus', 0):g} GPU free, {d.get('ip')}{' (head)' if d.get('head') else ''}")
            avail = d.get("memory_free_bytes")
        elif d.get("kind") == "cpu":
            load = f"{d.get('cores_logical', '?')} cores, load {(d.get('load_avg') or [0.0])[0]:.2f}"
            avail = d.get("memory_available_bytes")
        else:
            util = d.get("utilization_pct")
            load = f"{d.get('model', '')}" + (f", {util:.0f}% busy" if util is not None else "")
            avail = d.get("memory_free_bytes", d.get("free_bytes"))
        lines.append(f"{str(d.get('name', '?'))[:12]:<12} {d.get('kind', '?'):<4} "
                     f"{_mib(d.get('memory_total_bytes')):>12} {_mib(avail):>12} {_mib(d.get('reserved_bytes')):>12} "
                     f"{_mib(d.get('budget_bytes')):>12}  {load}")
        for holder, size in sorted((d.get("holders") or {}).items()):
            lines.append(f"  {_mib(size):>12}  {holder}")
    if not any(d.get("kind") == "gpu" or d.get("gpus") for d in devices):
        lines.append("(no GPU)")
    return "\n".join(lines)


LATENCIES = ("queue_time_s", "ttft_s", "tpot_s", "total_time_s")


def _ms(v: Any) -> str:
    return "-" if v is None else f"{1000 * v:.1f}"


def format_metrics(m: dict[str, Any]) -> str:
    """The ``metrics`` reply for people: processes per state, finished processes (reasons, tokens, latency
    percentiles in milliseconds over the last 1000), and one row per model instance (steps, batch, tokens out,
    KV blocks, preemptions, swaps, mean step time)."""
    counts = ", ".join(f"{k.lower()} {v}" for k, v in (m.get("counts") or {}).items() if v) or "none"
    fin = m.get("finished") or {}
    reasons = ", ".join(f"{k} {v}" for k, v in sorted((fin.get("finish_reasons") or {}).items())) or "none"
    lines = [f"processes: {counts}",
             f"finished: {fin.get('count', 0)} ({reasons}); tokens in {fin.get('tokens_in', 0)}, "
             f"out {fin.get('tokens_out', 0)}",
             f"{'LATENCY (ms)':<14} {'MEAN':>9} {'P50':>9} {'P95':>9} {'MAX':>9}"]
    for name in LATENCIES:
        s = fin.get(name) or {}
        lines.append(f"{name.removesuffix('_s'):<14} {_ms(s.get('mean')):>9} {_ms(s.get('p50')):>9} "
                     f"{_ms(s.get('p95')):>9} {_ms(s.get('max')):>9}")
    lines += ["", f"{'MODEL':<40} {'STEPS':>7} {'BATCH':>5} {'TOK OUT':>8} {'KV USED/TOTAL':>14} {'PREEMPT':>7} "
                  f"{'SWAP OUT/IN':>11} {'STEP MS':>8}"]
    for ex in m.get("models") or []:
        kv = f"{ex.get('kv_used', 0)}/{ex.get('kv_total', 0)}"
        swaps = f"{ex.get('swaps_out', 0)}/{ex.get('swaps_in', 0)}"
        name = f"{typed_name(str(ex.get('model', '')))} #{ex.get('executor', '?')}"  # one row per instance
        lines.append(f"{name[-40:]:<40} {ex.get('steps', 0):>7} {ex.get('batch_mean', 0.0):>5.1f} "
                     f"{ex.get('tokens_out', 0):>8} {kv:>14} {ex.get('preemptions', 0):>7} {swaps:>11} "
                     f"{_ms(ex.get('step_time_mean_s')):>8}")
    if not m.get("models"):
        lines.append("(no model loaded)")
    return "\n".join(lines)


def typed_name(model: str) -> str:
    """A model as a user types it: a store model by its name (``store:/models/x`` -> ``x``), a directory as is."""
    return model.removeprefix("store:/models/")
