"""What ``llmos bench`` reports: a load point's records summed up (throughput, latency percentiles, errors),
the human table of a sweep, and the plot of latency percentiles against load (matplotlib, Agg)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from llmos.bench_run import Load, Record
from llmos.bench_workload import describe_lengths

QUANTILES = (50, 90, 99)
TIMING_NOTE = ("TTFT and TPOT are measured by this client from the stream: TTFT from sending spawn to the first "
               "chunk with a token; TPOT (last token's arrival - first's) / (output tokens - 1), per request; "
               "E2E from spawn to the result. The kernel's own stats of each result (ttft_s, tpot_s) are the "
               "'kernel' rows: the client's add the bus's round trips. CPU 100% = one core.")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values`` (not empty), interpolated linearly between the two nearest
    ranks (numpy's default method)."""
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def distribution(values: list[float | None], scale: float = 1000.0) -> dict[str, float] | None:
    """{mean, p50, p90, p99} of the values given (None ones left out), times ``scale`` (s -> ms by default);
    None when there is no value."""
    xs = [x * scale for x in values if x is not None]
    if not xs:
        return None
    return {"mean": sum(xs) / len(xs), **{f"p{q}": percentile(xs, q) for q in QUANTILES}}


def summarise(records: list[Record], wall_s: float, load: Load, resources: dict[str, Any]) -> dict[str, Any]:
    """One load point's report (the JSON's ``points[i]``). Throughputs count completed requests only, over
    ``wall_s`` (first send to last end); latencies in milliseconds."""
    ok = [r for r in records if r.error is None]
    out = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    per_s = (lambda x: x / wall_s) if wall_s > 0 else (lambda x: 0.0)
    return {
        "load": load.wire(), "requests": len(records), "completed": len(ok), "errors": len(records) - len(ok),
        "error_kinds": dict(Counter(r.error for r in records if r.error is not None)),
        "duration_s": wall_s, "prompt_tokens": prompt, "output_tokens": out,
        "output_tokens_asked": sum(r.asked_tokens for r in ok),
        "request_throughput": per_s(len(ok)), "output_throughput": per_s(out), "total_throughput": per_s(prompt + out),
        "ttft_ms": distribution([r.ttft_s for r in ok]), "tpot_ms": distribution([r.tpot_s for r in ok]),
        "e2e_ms": distribution([r.latency_s for r in ok]),
        "kernel": {"ttft_ms": distribution([r.kernel_ttft_s for r in ok]),
                   "tpot_ms": distribution([r.kernel_tpot_s for r in ok]),
                   "queue_ms": distribution([r.kernel_queue_s for r in ok])},
        "warnings": sorted({w for r in records for w in r.warnings})[:5],
        "resources": resources,
    }


def _num(x: Any, fmt: str = ".1f") -> str:
    return "n/a" if x is None or isinstance(x, str) else format(x, fmt)


def _dist_rows(label: str, d: dict[str, float] | None, keys: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(f"{label} {k}", _num(d.get(k) if d else None)) for k in keys]


def _rows(p: dict[str, Any]) -> list[tuple[str, str]]:
    res = p["resources"]

    def mp(name: str, fmt: str = ".0f") -> str:
        v = res.get(name)
        return "n/a" if not isinstance(v, dict) else f"{v['mean']:{fmt}} / {v['peak']:{fmt}}"

    rows = [("requests ok / errors", f"{p['completed']} / {p['errors']}"),
            ("duration s", _num(p["duration_s"], ".2f")),
            ("requests/s", _num(p["request_throughput"], ".2f")),
            ("output tok/s", _num(p["output_throughput"])),
            ("total tok/s", _num(p["total_throughput"]))]
    keys = ("mean", "p50", "p90", "p99")
    rows += _dist_rows("TTFT ms", p["ttft_ms"], keys)
    rows += _dist_rows("TPOT ms", p["tpot_ms"], keys)
    rows += _dist_rows("E2E ms", p["e2e_ms"], keys)
    rows += _dist_rows("kernel TTFT ms", p["kernel"]["ttft_ms"], ("p50", "p99"))
    rows += _dist_rows("kernel TPOT ms", p["kernel"]["tpot_ms"], ("p50", "p99"))
    rows += [("CPU % mean / peak", mp("cpu_percent")), ("RSS MiB mean / peak", mp("rss_mib")),
             ("GPU util % mean / peak", mp("gpu_util_percent")), ("GPU MiB mean / peak", mp("gpu_memory_mib")),
             ("machine load avg 1 min", f"{res['load_avg_1m']:.1f} / {res['cores']} cores")]
    return rows


def _value(v: Any) -> str:
    return v if isinstance(v, str) else f"{v:g}"


def load_label(load: dict[str, Any]) -> str:
    if load["kind"] == "rate":
        return f"rate {_value(load['value'])}" + ("" if load["value"] == "inf" else "/s")
    return f"concurrency {load['value']}"


def format_table(report: dict[str, Any]) -> str:
    """The human table: a line on the workload, then one row per measure and one column per load point."""
    w = report["workload"]
    head = (f"model {report['model']}; {w['requests_per_point'] or 'for ' + str(w['duration_s']) + ' s'}"
            f"{' requests' if w['requests_per_point'] else ''} per point; prompts {describe_lengths(w['prompt_len'])} tokens "
            f"({w['prompts']}), outputs {describe_lengths(w['output_len'])} tokens (EOS ignored); temperature {w['temperature']}, "
            f"priority {w['priority']}, seed {w['seed']}")
    points = report["points"]
    cols = [[load_label(p["load"])] + [v for _, v in _rows(p)] for p in points]
    names = ["load"] + [k for k, _ in _rows(points[0])] if points else ["load"]
    width0 = max(map(len, names))
    widths = [max(map(len, c)) for c in cols]
    lines = [head, ""]
    for i, name in enumerate(names):
        lines.append(name.ljust(width0) + "".join("  " + c[i].rjust(wd) for c, wd in zip(cols, widths)))
    for p in points:
        if p["error_kinds"]:
            lines.append(f"{load_label(p['load'])}: errors " + ", ".join(f"{k} x{n}" for k, n in
                                                                        sorted(p["error_kinds"].items())))
        for warn in p["warnings"]:
            lines.append(f"{load_label(p['load'])}: kernel warning: {warn}")
    lines += ["", TIMING_NOTE]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Write a PNG to ``path``: TTFT and TPOT p50/p99 (ms) and output tok/s against the load of each point.

    A rate of inf is drawn to the right of the largest finite rate, labelled "inf"."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    points = report["points"]
    kind = points[0]["load"]["kind"]
    values = [p["load"]["value"] for p in points]
    finite = [float(v) for v in values if v != "inf"]
    inf_x = (max(finite) * 2 if finite else 1.0)
    xs = [inf_x if v == "inf" else float(v) for v in values]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, title in ((axes[0], "ttft_ms", "TTFT (ms)"), (axes[1], "tpot_ms", "TPOT (ms)")):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ys = [(p[key] or {}).get(q, math.nan) for p in points]
            ax.plot(xs, ys, style, label=q)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.legend()
    axes[2].plot(xs, [p["output_throughput"] for p in points], "o-")
    axes[2].set_title("output tokens/s")
    axes[2].set_ylim(bottom=0)
    wide = min(xs) > 0 and max(xs) / min(xs) >= 8  # a doubling sweep (1,2,4,8...) spaced evenly
    for ax in axes:
        if wide:
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
        ax.set_xlabel("request rate (req/s)" if kind == "rate" else "concurrency (requests in flight)")
        ax.set_xticks(xs)
        ax.set_xticklabels([_value(v) for v in values])
        ax.grid(alpha=0.3)
    fig.suptitle(f"llmos bench: {Path(str(report['model'])).name} ({describe_lengths(report['workload']['prompt_len'])} prompt / "
                 f"{describe_lengths(report['workload']['output_len'])} output tokens)")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
