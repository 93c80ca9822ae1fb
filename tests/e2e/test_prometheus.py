"""Prometheus over a real kernel: the session kernel runs with --metrics-port (tests/conftest.py); the text is
scraped over HTTP and through the prometheus syscall, and read with prometheus_client's parser."""

import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def _samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return _samples(r.read().decode())


def _model_value(samples: dict, name: str, model: str) -> float:
    return sum(v for (n, labels), v in samples.items() if n == name and dict(labels).get("model") == model)


def test_a_scrape_counts_a_finished_process_in_the_ttft_histogram_and_token_counters(kernel, client, tiny_model):
    assert client.kernel_info()["metrics_url"] == kernel.metrics_url
    before = _scrape(kernel.metrics_url)
    pid = client.spawn(prompt="Hello", model=tiny_model, max_new_tokens=4, temperature=0, ignore_eos=True)
    assert client.wait(pid, timeout=60).finish_reason == "length"
    after = _scrape(kernel.metrics_url)
    model = next(dict(labels)["model"] for (n, labels) in after if n == "llmos_kv_blocks_capacity")
    assert Path(model) == Path(tiny_model)
    grown = {name: _model_value(after, name, model) - _model_value(before, name, model)
             for name in ("llmos_time_to_first_token_seconds_count", "llmos_generation_tokens_total",
                          "llmos_e2e_request_latency_seconds_count")}
    assert grown["llmos_time_to_first_token_seconds_count"] >= 1 and grown["llmos_generation_tokens_total"] >= 4
    assert _model_value(after, "llmos_kv_blocks_capacity", model) > 0
    assert _model_value(after, "llmos_executor_ready", model) >= 1
    assert any(n == "llmos_processes" for n, _ in after)
    assert after[("llmos_device_memory_budget_bytes", (("device", "cpu"), ("kind", "cpu")))] > 0


def test_the_prometheus_syscall_and_the_cli_give_the_same_families_as_the_port(kernel, client):
    names = {fam.name for fam in text_string_to_metric_families(client.prometheus())}
    assert {"llmos_time_to_first_token_seconds", "llmos_kv_blocks_used", "llmos_processes",
            "llmos_preemptions", "llmos_swaps_out", "process_resident_memory_bytes"} <= names
    out = subprocess.run([sys.executable, "-m", "llmos", "metrics", "--prometheus"], env=kernel.env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert {fam.name for fam in text_string_to_metric_families(out.stdout)} >= names - {"process_cpu_seconds"}


def test_a_metrics_port_in_use_stops_the_kernel_start_with_one_line(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "llmos.kernel.main", "--home", str(tmp_path / "h"),
                              "--metrics-port", str(port)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 4, out.stderr  # as for a bus address in use
    assert f"--metrics-port {port}" in out.stderr and "Traceback" not in out.stderr
