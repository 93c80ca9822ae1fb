"""The kernel's Prometheus families (kernel/prometheus.py), rendered from a snapshot and read back with
prometheus_client's own parser."""

import asyncio
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from llmos.kernel.accounting import BUCKETS, FinishedStats
from llmos.kernel.prometheus import Exporter, Snapshot


def _snapshot() -> Snapshot:
    fin = FinishedStats()
    fin.add({"prompt_tokens": 5, "output_tokens": 3, "queue_time_s": 0.02, "ttft_s": 0.03, "tpot_s": 0.004,
             "total_time_s": 0.2}, "length", "store:/models/tiny", {"preemptions": 2, "swaps_out": 1})
    fin.add({"prompt_tokens": 7, "output_tokens": 1, "queue_time_s": 0.5, "ttft_s": 7.0, "tpot_s": None,
             "total_time_s": 7.0}, "stop", "store:/models/tiny", {})
    metrics = {"counts": {"RUNNING": 1, "ZOMBIE": 2}, "totals": fin.totals(),
               "processes": [{"model": "/m/a", "state": "RUNNING"}],
               "models": [{"model": "/m/a", "executor": 3, "device": "cpu", "ready": True, "kv_used": 4,
                           "kv_free": 60, "kv_total": 64, "preemptions": 9, "swaps_out": 1, "steps": 12,
                           "batch_last": 1, "tokens_out": 30, "running": 1}]}
    devices = [{"kind": "cpu", "name": "cpu", "budget_bytes": 1000, "reserved_bytes": 400, "free_bytes": 600}]
    return Snapshot(metrics, devices, 1234.5)


def _parse(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _text(snap: Snapshot) -> str:
    async def go():
        async def gather():
            return snap
        return await Exporter(gather, asyncio.get_running_loop()).text()
    return asyncio.run(go())


def test_finished_processes_become_cumulative_histograms_per_model_in_seconds():
    got = _parse(_text(_snapshot()))
    tiny = (("model", "tiny"),)
    assert got[("llmos_time_to_first_token_seconds_count", tiny)] == 2
    assert got[("llmos_time_to_first_token_seconds_sum", tiny)] == 7.03
    assert got[("llmos_time_to_first_token_seconds_bucket", (("le", "0.05"), ("model", "tiny")))] == 1
    assert got[("llmos_time_to_first_token_seconds_bucket", (("le", "10.0"), ("model", "tiny")))] == 2
    assert got[("llmos_time_to_first_token_seconds_bucket", (("le", "+Inf"), ("model", "tiny")))] == 2
    assert got[("llmos_time_per_output_token_seconds_count", tiny)] == 1  # a one-token process has no TPOT
    buckets = [v for (n, labels), v in got.items() if n == "llmos_e2e_request_latency_seconds_bucket"]
    assert buckets == sorted(buckets) and len(buckets) == len(BUCKETS["total_time_s"]) + 1


def test_counters_gauges_and_devices_carry_their_labels_and_units():
    got = _parse(_text(_snapshot()))
    assert got[("llmos_processes_finished_total", (("finish_reason", "length"), ("model", "tiny")))] == 1
    assert got[("llmos_prompt_tokens_total", (("model", "tiny"),))] == 12
    assert got[("llmos_generation_tokens_total", (("model", "tiny"),))] == 4
    inst = (("device", "cpu"), ("executor", "3"), ("model", "/m/a"))
    assert got[("llmos_kv_blocks_used", inst)] == 4 and got[("llmos_kv_blocks_capacity", inst)] == 64
    assert got[("llmos_preemptions_total", inst)] == 9 and got[("llmos_swaps_out_total", inst)] == 1
    assert got[("llmos_executor_ready", inst)] == 1
    assert got[("llmos_processes", (("state", "ZOMBIE"),))] == 2
    assert got[("llmos_model_processes", (("model", "/m/a"), ("state", "RUNNING")))] == 1
    assert got[("llmos_device_memory_free_bytes", (("device", "cpu"), ("kind", "cpu")))] == 600
    assert got[("llmos_kernel_start_time_seconds", ())] == 1234.5
    assert ("process_resident_memory_bytes", ()) in got  # the kernel process's own, from prometheus_client


def test_the_http_endpoint_serves_the_same_registry_gathered_on_the_kernels_loop():
    snap = _snapshot()

    async def go():
        async def gather():
            return snap
        ex = Exporter(gather, asyncio.get_running_loop())
        port = ex.serve(0, "127.0.0.1")
        url = f"http://127.0.0.1:{port}/metrics"
        try:
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
            # Prometheus's ?name[]= asks for some families only
            some = await asyncio.to_thread(lambda: urllib.request.urlopen(
                url + "?name[]=llmos_kv_blocks_free", timeout=10).read().decode())
        finally:
            await asyncio.to_thread(ex.close)
        return body, some

    body, some = asyncio.run(go())
    got = _parse(body)
    assert got[("llmos_kv_blocks_free", (("device", "cpu"), ("executor", "3"), ("model", "/m/a")))] == 60
    assert {name for name, _ in _parse(some)} == {"llmos_kv_blocks_free"}


def test_every_metric_the_grafana_dashboard_and_the_docs_name_is_one_the_kernel_exports():
    import json
    import re
    from pathlib import Path

    docs = Path(__file__).resolve().parents[2] / "docs"
    samples = {name for name, _ in _parse(_text(_snapshot()))}
    exprs = [t["expr"] for p in json.loads((docs / "grafana" / "llmos.json").read_text())["panels"]
             for t in p["targets"]]
    named = set(re.findall(r"llmos_[a-z0-9_]+", " ".join(exprs)))
    table = (docs / "operations.md").read_text().split("## Metrics (Prometheus)")[1].split("\n## ")[0]
    for row in re.findall(r"^\| `(llmos_[a-z0-9_]+)`(?:, `([a-z0-9_]+)`)?(?:, `([a-z0-9_]+)`)?", table, re.M):
        first = row[0]
        named.add(first)
        for more in filter(None, row[1:]):  # `_free`: the first name with its last part(s) replaced
            tail = more.strip("_").split("_")
            named.add("_".join(first.split("_")[:-len(tail)] + tail) if more.startswith("_") else more)
    assert len(named) > 15
    missing = {n for n in named if not ({n, n + "_total", n + "_bucket", n + "_count"} & samples)}
    assert not missing, missing
