"""The model registry end to end: load on demand, eviction under a memory cap, keep-alive, instances, devices."""

import json
import shutil
import subprocess
import sys

import pytest

from llmos import InvalidArgument
from llmos.cli import main as cli_main
from llmos.syscalls.errors import Busy, OutOfMemory
from tests.conftest import KernelProc, wait_for
from tests.tinymodel import make_tiny_llama

LONG = {"max_new_tokens": 100000, "ignore_eos": True}


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    # long contexts: a "busy" process is still running whatever the machine's speed
    root = tmp_path_factory.mktemp("registry")
    return (str(make_tiny_llama(root / "a", seed=1, context=100_000)),
            str(make_tiny_llama(root / "b", seed=2, context=100_000)))


@pytest.fixture(scope="module")
def capped():
    # each tiny model's estimate is ~350 MiB of worker overhead plus a KV pool of at least one context
    # (100,000 tokens, ~50 MiB): one fits under 600 MiB, two do not
    k = KernelProc(extra=["--memory-limit", "600M"])
    yield k
    k.stop()


def loaded(c):
    return {d["model"]: d for d in c.models()}


@pytest.mark.slow  # starts, loads or kills kernels for 6-25 s: the slow step of .ci/run
def test_models_load_on_demand_and_the_idle_one_is_evicted_then_reloaded(capped, two_models):
    a, b = two_models
    with capped.client() as c:
        c.wait(c.spawn(prompt="x", model=a, max_new_tokens=2))
        first_a = loaded(c)[a]["executors"][0]["worker_pid"]
        c.wait(c.spawn(prompt="x", model=b, max_new_tokens=2))
        assert set(loaded(c)) == {b}  # a was idle: evicted to make room
        c.wait(c.spawn(prompt="x", model=a, max_new_tokens=2))
        assert set(loaded(c)) == {a}
        assert loaded(c)[a]["executors"][0]["worker_pid"] != first_a


def test_a_busy_model_is_not_evicted_and_the_request_gets_enomem(capped, two_models):
    a, b = two_models
    with capped.client() as c:
        pid = c.spawn(prompt="busy", model=a, **LONG)
        with pytest.raises(OutOfMemory):
            c.spawn(prompt="x", model=b, max_new_tokens=2)
        with pytest.raises(Busy):
            c.model_unload(a)
        c.model_unload(a, force=True)
        r = c.wait(pid)
        assert r.finish_reason == "error" and "unloaded" in r.error["message"]
        assert loaded(c) == {}


@pytest.mark.slow  # starts, loads or kills kernels for 6-25 s: the slow step of .ci/run
def test_a_pinned_model_stays_and_keep_alive_zero_unloads_after_use(capped, two_models):
    a, b = two_models
    with capped.client() as c:
        c.model_load(a, keep_alive=-1)
        with pytest.raises(OutOfMemory):
            c.wait(c.spawn(prompt="x", model=b, max_new_tokens=2))
        c.model_unload(a)
        c.wait(c.spawn(prompt="x", model=b, max_new_tokens=2, keep_alive=0))
        wait_for(lambda: b not in loaded(c), 10, "b to unload after use")
        assert loaded(c) == {}


def test_model_info_estimates_memory_before_loading(capped, two_models):
    with capped.client() as c:
        info = c.model_info(two_models[0])
        est = info["estimate"]
        assert info["loaded"] is False and est["parameters"] > 0
        assert est["total_bytes"] == est["weight_bytes"] + est["kv_bytes"] + est["overhead_bytes"]


def test_two_instances_share_the_work_and_models_shows_memory_per_instance_and_in_total(kernel, tmp_path, capsys):
    import threading

    path = str(make_tiny_llama(tmp_path / "c", seed=3))
    stages, loaded = set(), threading.Event()

    def watch():  # what model_info says while the load runs: each instance's load stage
        with kernel.client() as w:
            while not loaded.is_set():
                stages.update(e["stage"] for e in w.model_info(path).get("executors") or [] if e.get("stage"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    with kernel.client() as c:
        # llmos load and unload, as a user runs them
        try:
            assert cli_main(["--address", kernel.address, "load", path, "--instances", "2", "--kv-policy", "dynamic",
                             "--kv-blocks", "16", "--kv-max-blocks", "512", "--json"]) == 0
        finally:
            loaded.set()
            watcher.join(30)
        assert "importing torch and transformers" in stages and stages <= {
            "starting the worker", "importing torch and transformers", "reading weights", "building the KV pool"}
        d = json.loads(capsys.readouterr().out)
        assert all(e["stage"] is None for e in d["executors"])  # ready: no stage
        assert d["instances"] == 2 and d["kv_policy"] == "dynamic" and c.model_info(path)["loaded"] is True
        assert d["instances"] == 2 and len({e["worker_pid"] for e in d["executors"]}) == 2
        # both workers built (or found) the native CPU kernels; without a compiler they use torch's
        expected = "native" if shutil.which("cc") or shutil.which("gcc") else "torch"
        assert [e["kernels"] for e in d["executors"]] == [expected, expected]
        pids = [c.spawn(prompt=f"w{i}", model=path, **LONG) for i in range(4)]
        # tokens_out only grows: once both instances produced tokens the work was shared
        wait_for(lambda: all(e["tokens_out"] > 0 for e in c.model_info(path)["executors"]), 20,
                 "both instances to generate")
        assert cli_main(["--address", kernel.address, "models"]) == 0
        header, *rows = capsys.readouterr().out.splitlines()
        assert header.split()[-3:] == ["MEM/INST", "MEM", "TOTAL"]
        [row] = [r for r in rows if r.startswith(path[-48:])]
        each, total = row.split()[-4], row.split()[-2]
        per_instance = d["estimate"]["total_bytes"] / 2**20
        assert (int(each), int(total)) == (round(per_instance), round(2 * per_instance))
        for p in pids:
            c.kill(p, "KILL")
            c.wait(p)
        assert cli_main(["--address", kernel.address, "unload", path]) == 0
        assert capsys.readouterr().out.strip() == f"unloaded {path}" and c.model_info(path)["loaded"] is False


def test_metrics_report_batch_sizes_and_kv_blocks(client, tiny_model):
    # measured as deltas: the shared model's counters also hold earlier tests' traffic
    def executor():
        met = client.metrics()
        [ex] = [e for e in met["models"] if e["model"] == tiny_model]
        return met, ex

    client.wait(client.spawn(prompt="warm", model=tiny_model, max_new_tokens=1))  # loaded before we count
    met0, ex0 = executor()
    pids = [client.spawn(prompt=f"m{i}", model=tiny_model, max_new_tokens=30, ignore_eos=True) for i in range(3)]
    for p in pids:
        client.wait(p)
    met, ex = executor()
    steps = ex["steps"] - ex0["steps"]
    batched = ex["batch_mean"] * ex["steps"] - ex0["batch_mean"] * ex0["steps"]  # process-steps in our steps
    assert ex["tokens_out"] - ex0["tokens_out"] == 90 and 30 <= steps < 90  # 90 tokens in fewer steps: batched
    assert round(batched) == 90 and ex["batch_max"] >= 2 and ex["kv_total"] > 0
    assert ex["kv_used"] == 0  # every block came back
    assert met["finished"]["count"] == met0["finished"]["count"] + 3 and met["finished"]["ttft_s"]["p50"] > 0


def test_kill_returns_every_kv_block_in_the_worker(client, long_model):
    def usage():
        [ex] = [e for e in client.metrics()["models"] if e["model"] == long_model]
        return ex

    pids = [client.spawn(prompt="k" * 50, model=long_model, **LONG) for _ in range(4)]
    wait_for(lambda: usage()["kv_used"] > 0 and usage()["running"] == 4, 20, "4 processes holding KV blocks")
    for i, p in enumerate(pids):
        client.kill(p, "KILL" if i % 2 else "TERM")
        client.wait(p)
    ex = wait_for(lambda: (lambda e: e if e["kv_used"] == 0 else None)(usage()), 10, "every KV block back")
    assert ex["kv_free"] == ex["kv_total"]


def nvidia_gpus() -> list[str]:
    """The NVIDIA GPUs this machine really has, by NVML (an empty list without a driver or a device)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        return [f"cuda:{i}" for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


def test_llmos_devices_lists_the_cpu_and_exactly_the_gpus_nvml_reports(kernel):
    gpus = nvidia_gpus()
    r = subprocess.run([sys.executable, "-m", "llmos", "devices"], env=kernel.env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.splitlines()[1].startswith("cpu ")
    assert ("(no GPU)" in r.stdout) == (not gpus) and all(g in r.stdout for g in gpus)
    devs = json.loads(subprocess.run([sys.executable, "-m", "llmos", "devices", "--json"], env=kernel.env,
                                     capture_output=True, text=True, timeout=60).stdout)
    assert [d["kind"] for d in devs] == ["cpu"] + ["gpu"] * len(gpus) and devs[0]["cores_logical"] >= 1
    assert [d["name"] for d in devs[1:]] == gpus


def test_bad_load_options_are_refused_and_ebusy_says_what_differs_and_what_to_run(client, tiny_model):
    client.wait(client.spawn(prompt="x", model=tiny_model, max_new_tokens=1))  # loaded, static policy
    with pytest.raises(InvalidArgument, match="no device 'cuda:7'"):
        client.model_load(tiny_model, device="cuda:7")
    with pytest.raises(InvalidArgument):
        client.model_load(tiny_model, kv_policy="greedy")
    with pytest.raises(Busy) as exc:
        client.model_load(tiny_model, kv_policy="dynamic", kv_blocks=7)
    assert "kv_policy (asked dynamic, loaded static)" in exc.value.message
    assert "kv_blocks (asked 7, loaded " in exc.value.message and f"llmos unload {tiny_model}" in exc.value.message
    assert client.model_load(tiny_model)["loaded"] is True  # same options: it is just returned


def test_the_ray_backend_on_a_kernel_without_ray_and_ray_options_without_it_are_einval(client, tiny_model):
    from llmos.syscalls.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="--ray"):
        client.model_load(tiny_model + "/", backend="ray")
    for opts in ({"num_cpus": 2}, {"placement": "pack"}, {"backend": "local", "num_gpus": 1}):
        with pytest.raises(InvalidArgument, match="backend='ray'"):
            client.model_load(tiny_model, **opts)
    # auto is the local backend here: the loaded model, as it is
    assert client.model_load(tiny_model, backend="auto")["backend"] == "local"
    assert {e["backend"] for e in client.model_info(tiny_model)["executors"]} == {"local"}
