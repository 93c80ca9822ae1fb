"""`llmos bench` against the session kernel: a tiny run's report is complete and consistent, a sweep draws a PNG,
bad flags are usage errors; and its pure parts (the seeded workload, percentiles, the GPU sampler) alone."""

import json
import math
import random
import signal
import subprocess
import sys
import uuid
from types import SimpleNamespace

import pytest

from llmos.bench_report import percentile
from llmos.bench_sample import Gpu, Sampler
from llmos.bench_workload import Lengths, arrival_gaps, requests, seeded_text, token_pool
from llmos.cli import main as cli_main
from tests.conftest import wait_for

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(kernel, model, capsys, *argv):
    """(exit status, stdout, stderr) of `llmos bench` run in this process against the session kernel."""
    code = cli_main(["bench", "--address", kernel.address, "--model", model, *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def ordered(d):
    return d is not None and d["p50"] <= d["p90"] <= d["p99"] and d["mean"] > 0


# -- the pure parts ---------------------------------------------------------------------------------------
def test_the_workload_is_repeatable_from_its_seed_and_keeps_to_its_length_distributions():
    pool = list(range(100, 400))
    take = lambda seed, p, o: [next(g) for g in [requests(pool, p, o, seed)] for _ in range(200)]  # noqa: E731
    uni, fixed = Lengths(20, 0.5, "uniform"), Lengths(7)
    a, b, c = take(1, uni, fixed), take(1, uni, fixed), take(2, uni, fixed)
    assert a == b and a != c
    assert {len(r.prompt_ids) for r in a} <= set(range(10, 31)) and len({len(r.prompt_ids) for r in a}) > 10
    assert {r.max_new_tokens for r in a} == {7}
    assert all(set(r.prompt_ids) <= set(pool) for r in a)
    normal = [r.max_new_tokens for r in take(3, Lengths(5), Lengths(50, 0.4, "normal"))]
    assert min(normal) >= 1 and max(normal) <= 100 and abs(sum(normal) / len(normal) - 50) < 5
    # a prompt longer than the pool wraps around it: still exactly its length
    assert [len(r.prompt_ids) for r in take(0, Lengths(25), fixed)[:3]] == [25] * 3 and \
        len(next(requests([5, 6, 7], Lengths(8), fixed, 0)).prompt_ids) == 8
    gaps = arrival_gaps(4.0, 0)
    mean_gap = sum(next(gaps) for _ in range(4000)) / 4000
    assert abs(mean_gap - 0.25) < 0.025  # Poisson arrivals at 4 requests/s
    assert {next(arrival_gaps(math.inf, 0)) for _ in range(3)} == {0.0}


def test_prompts_are_cut_from_tokenised_text_or_records():
    calls = []

    def tokenize(text):
        calls.append(text)
        return [len(w) for w in text.split()]

    pool = token_pool(tokenize, 300, seed=5)
    # one token a word here: 75 words, then twice as many until the pool is long enough
    assert len(pool) == 300 and calls == [seeded_text(5, n) for n in (75, 150, 300)]
    assert token_pool(tokenize, 300, seed=5) == pool
    calls.clear()
    assert token_pool(tokenize, 4, 0, records=iter(["one two", "three four five", "six"])) == [3, 3, 5, 4, 4]
    with pytest.raises(Exception, match="no text"):
        token_pool(tokenize, 4, 0, records=iter([]))


def test_percentiles_interpolate_between_ranks_as_numpy_does():
    import numpy

    rng = random.Random(0)
    for n in (1, 2, 7, 100):
        xs = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(numpy.percentile(xs, q)))


def test_the_gpu_is_sampled_through_nvml_where_there_is_one_and_is_na_otherwise():
    # the one stand-in of this file: NVML's answers, since no NVIDIA GPU exists here
    nvml = SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=[30, 50][h]),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=[1, 3][h] * 2**30))
    s = Sampler(None, interval=60, gpu=Gpu(nvml)).start()
    s.sample()
    got = s.stop()
    assert got["gpu_util_percent"] == {"mean": 40.0, "peak": 40.0}
    assert got["gpu_memory_mib"] == {"mean": 4096.0, "peak": 4096.0}
    assert got["cpu_percent"] == "n/a" and got["processes"] == "n/a"  # a kernel on another machine

    def broken():
        raise OSError("NVML Shared Library Not Found")

    assert not Gpu(SimpleNamespace(nvmlInit=broken)).available


# -- against the session kernel ---------------------------------------------------------------------------
def test_a_tiny_closed_loop_run_reports_consistent_counts_percentiles_and_resources(kernel, tiny_model, capsys):
    code, out, err = bench(kernel, tiny_model, capsys, "--requests", "4", "--concurrency", "2", "--prompt-len", "12",
                           "--prompt-len-spread", "0.5", "--output-len", "4", "--seed", "3", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"] == tiny_model and report["workload"]["seed"] == 3
    assert report["workload"]["prompt_len"] == {"mean": 12, "spread": 0.5, "dist": "uniform"}  # numbers, not text
    assert report["workload"]["output_len"] == {"mean": 4, "spread": 0.0, "dist": "uniform"}
    (p,) = report["points"]
    assert p["load"] == {"kind": "concurrency", "value": 2}
    assert (p["requests"], p["completed"], p["errors"], p["error_kinds"]) == (4, 4, 0, {})
    assert p["output_tokens"] == p["output_tokens_asked"] == 4 * 4  # EOS ignored: every length honoured
    assert 4 * 6 <= p["prompt_tokens"] <= 4 * 18
    assert p["request_throughput"] == pytest.approx(4 / p["duration_s"])
    assert p["total_throughput"] == pytest.approx((p["prompt_tokens"] + 16) / p["duration_s"])
    for d in (p["ttft_ms"], p["tpot_ms"], p["e2e_ms"], p["kernel"]["ttft_ms"], p["kernel"]["tpot_ms"]):
        assert ordered(d), d
    assert p["ttft_ms"]["p99"] <= p["e2e_ms"]["p99"] and p["e2e_ms"]["p99"] <= p["duration_s"] * 1000
    # the client's clock starts before spawn is sent and stops when the chunk arrives: never less than the kernel's
    assert p["ttft_ms"]["p50"] >= p["kernel"]["ttft_ms"]["p50"]
    res = p["resources"]
    assert res["processes"] == 2  # the kernel and the model's one worker
    assert res["rss_mib"]["peak"] >= res["rss_mib"]["mean"] > 10
    assert res["cpu_percent"]["peak"] >= res["cpu_percent"]["mean"] >= 0
    assert res["load_avg_1m"] >= 0 and res["cores"] >= 1
    if not Gpu().available:
        assert res["gpu_util_percent"] == res["gpu_memory_mib"] == "n/a"


def test_a_rate_sweep_prints_its_table_and_plots_latency_against_load(kernel, tiny_model, client, tmp_path, capsys):
    name = f"b{uuid.uuid4().hex[:10]}"
    src = tmp_path / "prompts.txt"
    src.write_text("\n".join(seeded_text(i, 40) for i in range(4)) + "\n")
    client.data.import_file(src, name)
    png = tmp_path / "sweep.png"
    try:
        code, out, err = bench(kernel, tiny_model, capsys, "--requests", "3", "--rate", "50,inf", "--prompt-len", "8",
                               "--output-len", "2", "--data", name, "--plot", str(png))
    finally:
        client.data.rm(name)
    assert code == 0, err
    lines = out.splitlines()
    assert f"data set {name}" in lines[0]
    header = next(ln for ln in lines if ln.startswith("load"))
    assert "rate 50/s" in header and "rate inf" in header
    for row in ("requests ok / errors", "output tok/s", "TTFT ms p99", "TPOT ms p50", "E2E ms p90",
                "kernel TTFT ms p50", "CPU % mean / peak", "RSS MiB mean / peak", "GPU util % mean / peak",
                "machine load avg 1 min"):
        assert any(ln.startswith(row) for ln in lines), row
    assert next(ln for ln in lines if ln.startswith("requests ok")).split()[-6:] == ["3", "/", "0", "3", "/", "0"]
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
    assert lines[-1] == f"plot: {png}"


@pytest.mark.parametrize("argv", [["--rate", "0"], ["--rate", "fast"], ["--concurrency", "0"],
                                  ["--rate", "1", "--concurrency", "2"], ["--requests", "3", "--duration", "1"],
                                  ["--prompt-len-spread", "1.5"], ["--output-len", "0"], ["--len-dist", "zipf"],
                                  ["--plot", "/nonexistent-dir/x.png"]])
def test_bad_flags_are_usage_errors_with_one_error_line(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if "error" in ln] == [err.splitlines()[-1]]
    assert err.splitlines()[-1].startswith("llmos bench: error: argument")


@pytest.mark.parametrize("argv,errno", [(["--data", "no-such-set"], "ENOENT"),
                                        (["--prompt-len", "1000", "--output-len", "100"], "EINVAL")])
def test_what_the_kernel_or_the_model_refuses_is_one_errno_line(argv, errno, kernel, tiny_model, capsys):
    code, out, err = bench(kernel, tiny_model, capsys, "--requests", "1", *argv)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"llmos: [{errno}]"), err


def _as_in_a_terminal():
    # a background child starts with SIGINT ignored: give it the default a terminal's Ctrl-C meets
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_ends_every_request_in_flight_and_exits_130(kernel, tiny_model, client):
    proc = subprocess.Popen([sys.executable, "-m", "llmos", "bench", "--address", kernel.address, "--model", tiny_model,
                             "--requests", "3", "--rate", "inf", "--prompt-len", "8", "--output-len", "900"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_as_in_a_terminal)
    try:
        def running():  # its three requests, once each has a token (not the warm-up: its prompt is not 8 tokens)
            pids = [p.pid for p in client.ps() if p.prompt_tokens == 8 and p.output_tokens > 0]
            return pids if len(pids) == 3 else None

        ours = wait_for(running, timeout=60, what="the bench's 3 requests running")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in err, err
    left = {p.pid for p in client.ps()} & set(ours)  # ended and reaped: nothing left behind
    assert not left, [(p.pid, p.state, p.output_tokens) for p in client.ps() if p.pid in left]
