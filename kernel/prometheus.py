"""The kernel's metrics in the Prometheus text format: one registry, rendered from a snapshot of the kernel.

What the ``prometheus`` syscall returns and ``llmos kernel start --metrics-port PORT`` serves on
``http://HOST:PORT/metrics`` (prometheus_client's own HTTP server, in a thread). Names and units follow
Prometheus's conventions (seconds, bytes, ``_total`` for counters; see docs/operations.md, "Metrics",
for every family); label sets are small (model, executor, device, state, finish_reason): no owner names,
no process text. Histograms are the kernel's own counts of finished processes (kernel/accounting.py
Totals), exposed as they are; counters of engine events come from each model instance's worker and
start again at 0 when an instance restarts (Prometheus's ``rate()`` allows for that). Idea: vLLM's
``vllm:time_to_first_token_seconds`` family and TGI's exporter; prometheus_client's custom collectors.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from llmos.kernel import __version__

HISTOGRAMS = {  # Totals' timing -> (family name, help)
    "ttft_s": ("llmos_time_to_first_token_seconds", "time from spawn to the first output token"),
    "tpot_s": ("llmos_time_per_output_token_seconds", "mean time between output tokens after the first"),
    "queue_time_s": ("llmos_queue_time_seconds", "time from spawn to first admission to a batch"),
    "total_time_s": ("llmos_e2e_request_latency_seconds", "time from spawn to the end of the process"),
}
INSTANCE_COUNTERS = {  # executor description key -> (family, help)
    "preemptions": ("llmos_preemptions", "processes taken out of the batch (priority, memory or STOP)"),
    "swaps_out": ("llmos_swaps_out", "KV caches swapped out of device memory"),
    "swaps_in": ("llmos_swaps_in", "KV caches swapped back in"),
    "recomputed_tokens": ("llmos_recomputed_tokens", "tokens prefilled again after a preemption by recompute"),
    "tokens_out": ("llmos_engine_generated_tokens", "tokens the engine generated, live processes included "
                   "(per executor; llmos_generation_tokens counts processes once they end)"),
    "steps": ("llmos_engine_steps", "engine steps (one batch forward each)"),
    "prefix_lookups": ("llmos_prefix_cache_lookups", "prompts looked up in the prefix cache"),
    "prefix_hits": ("llmos_prefix_cache_hits", "prompts that started from cached KV blocks"),
    "prefix_hit_tokens": ("llmos_prefix_cache_hit_tokens", "prompt tokens taken from the prefix cache, not computed"),
    "prefix_evictions": ("llmos_prefix_cache_evictions", "cached KV blocks evicted (least recently used) for room"),
}
INSTANCE_GAUGES = {  # executor description key -> (family, help)
    "kv_used": ("llmos_kv_blocks_used", "KV cache blocks in use"),
    "kv_free": ("llmos_kv_blocks_free", "KV cache blocks free"),
    "kv_total": ("llmos_kv_blocks_capacity", "KV cache blocks in the pool"),
    "swap_used": ("llmos_swap_blocks_used", "swapped-out KV blocks held in host memory"),
    "batch_last": ("llmos_batch_size", "processes in the last engine step"),
    "running": ("llmos_executor_running_processes", "processes placed on the model instance"),
    "prefix_cached_blocks": ("llmos_prefix_cache_blocks", "KV blocks held by no process, kept for their prefix "
                             "(free for allocation)"),
}
DEVICE_GAUGES = {
    "budget_bytes": ("llmos_device_memory_budget_bytes", "memory the kernel may reserve on the device"),
    "reserved_bytes": ("llmos_device_memory_reserved_bytes", "memory reserved by loaded models"),
    "free_bytes": ("llmos_device_memory_free_bytes", "budget not reserved"),
}


def model_label(model: str) -> str:
    """A model as a label value: a store model by its name, a directory by its path."""
    return model.removeprefix("store:/models/")


class Snapshot:
    """The kernel's state at one scrape: the metrics syscall's reply, the devices, the start time."""

    def __init__(self, metrics: dict, devices: list[dict], started: float) -> None:
        self.metrics, self.devices, self.started = metrics, devices, started


class _Collector:
    """A prometheus_client collector over a snapshot source (called once per scrape)."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        return families(self.source())

    def describe(self) -> Iterable[Metric]:
        """The families without samples: the registry indexes them by name (a scrape's ``?name[]=``)."""
        return families(Snapshot({}, [], 0.0))


def families(snap: Snapshot) -> list[Metric]:
    """Every metric family of one snapshot."""
    out: list[Metric] = []
    info = GaugeMetricFamily("llmos_kernel_info", "the kernel's version (value 1)", labels=["version"])
    info.add_metric([__version__], 1)
    start = GaugeMetricFamily("llmos_kernel_start_time_seconds", "the kernel's start, unix time")
    start.add_metric([], snap.started)
    out += [info, start]

    procs = GaugeMetricFamily("llmos_processes", "processes in the table, by state", labels=["state"])
    for state, n in sorted(snap.metrics.get("counts", {}).items()):
        procs.add_metric([state], n)
    per_model = GaugeMetricFamily("llmos_model_processes", "live processes by model and state",
                                  labels=["model", "state"])
    counted: dict[tuple[str, str], int] = {}
    for p in snap.metrics.get("processes", []):
        key = (model_label(p["model"]), p["state"])
        counted[key] = counted.get(key, 0) + 1
    for key, n in sorted(counted.items()):
        per_model.add_metric(list(key), n)
    out += [procs, per_model]

    out += _totals(snap.metrics.get("totals", {}))
    out += _instances(snap.metrics.get("models", []))
    out += _devices(snap.devices)
    return out


def _totals(totals: dict[str, dict]) -> list[Metric]:
    finished = CounterMetricFamily("llmos_processes_finished", "processes that ended, by finish reason",
                                   labels=["model", "finish_reason"])
    tokens_in = CounterMetricFamily("llmos_prompt_tokens", "prompt tokens of processes that ended",
                                    labels=["model"])
    tokens_out = CounterMetricFamily("llmos_generation_tokens", "output tokens of processes that ended (per "
                                     "model; llmos_engine_generated_tokens counts them as generated)",
                                     labels=["model"])
    hists = {k: HistogramMetricFamily(name, doc, labels=["model"]) for k, (name, doc) in HISTOGRAMS.items()}
    for model, t in sorted(totals.items()):
        label = model_label(model)
        for reason, n in sorted(t["finish_reasons"].items()):
            finished.add_metric([label, reason], n)
        tokens_in.add_metric([label], t["tokens_in"])
        tokens_out.add_metric([label], t["tokens_out"])
        for key, fam in hists.items():
            h = t["histograms"][key]
            cumulative, running = [], 0
            for bound, n in zip([*h["buckets"], float("inf")], h["counts"]):
                running += n
                cumulative.append((_bound(bound), running))
            fam.add_metric([label], cumulative, sum_value=h["sum"])
    return [finished, tokens_in, tokens_out, *hists.values()]


def _bound(b: float) -> str:
    return "+Inf" if b == float("inf") else repr(float(b))


def _instances(executors: list[dict]) -> list[Metric]:
    labels = ["model", "executor", "device"]  # not "instance": Prometheus gives every target that label
    counters = {k: CounterMetricFamily(n, d, labels=labels) for k, (n, d) in INSTANCE_COUNTERS.items()}
    gauges = {k: GaugeMetricFamily(n, d, labels=labels) for k, (n, d) in INSTANCE_GAUGES.items()}
    ready = GaugeMetricFamily("llmos_executor_ready", "1 when the model instance serves, 0 while it loads",
                              labels=labels)
    for ex in executors:
        values = [model_label(ex["model"]), str(ex["executor"]), str(ex.get("device") or "")]
        for key, fam in counters.items():
            fam.add_metric(values, float(ex.get(key) or 0))
        for key, fam in gauges.items():
            fam.add_metric(values, float(ex.get(key) or 0))
        ready.add_metric(values, 1.0 if ex.get("ready") else 0.0)
    return [*counters.values(), *gauges.values(), ready]


def _devices(devices: list[dict]) -> list[Metric]:
    gauges = {k: GaugeMetricFamily(n, d, labels=["device", "kind"]) for k, (n, d) in DEVICE_GAUGES.items()}
    for dev in devices:
        for key, fam in gauges.items():
            if dev.get(key) is not None:
                fam.add_metric([str(dev.get("name")), str(dev.get("kind"))], float(dev[key]))
    return list(gauges.values())


class Exporter:
    """The kernel's one registry: the kernel's families plus the kernel process's CPU and memory
    (prometheus_client's ProcessCollector: process_cpu_seconds_total, process_resident_memory_bytes, ...).

    ``gather`` is a coroutine function returning a Snapshot, run on the kernel's event loop: ``text()`` from
    the loop (the syscall), ``serve(port)`` from prometheus_client's HTTP thread.
    """

    SCRAPE_TIMEOUT_S = 10.0

    def __init__(self, gather: Callable[[], Any], loop: asyncio.AbstractEventLoop) -> None:
        self.gather, self.loop = gather, loop
        self._current: Snapshot | None = None  # the syscall's snapshot while it renders (see _snapshot)
        self._lock = threading.Lock()  # one syscall render at a time
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self._snapshot))
        self.registry.register(ProcessCollector(pid=lambda: os.getpid(), registry=None))
        self.server: Any = None

    def _snapshot(self) -> Snapshot:
        # rendering for the syscall: already gathered on the loop. (An HTTP scrape that comes meanwhile takes
        # that same fresh snapshot, which is as good as its own.)
        if self._current is not None:
            return self._current
        # the HTTP thread: gather on the kernel's loop, wait here
        return asyncio.run_coroutine_threadsafe(self.gather(), self.loop).result(self.SCRAPE_TIMEOUT_S)

    async def text(self) -> str:
        """The exposition text, from the event loop."""
        snap = await self.gather()

        def render() -> str:
            with self._lock:
                self._current = snap
                try:
                    return generate_latest(self.registry).decode()
                finally:
                    self._current = None

        return await asyncio.to_thread(render)

    def serve(self, port: int, host: str) -> int:
        """Serve ``/metrics`` on HOST:PORT in a thread (port 0: any free one); return the port."""
        self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self.server.server_address[1]

    def close(self) -> None:
        """Stop the HTTP server, if one runs (its thread ends)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
