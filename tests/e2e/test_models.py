"""The model registry end to end: load on demand, eviction under a memory cap, keep-alive, instances, devices."""

import json
import shutil
import subprocess
import sys
import time

import pytest

from llmos import InvalidArgument
from llmos.syscalls.errors import Busy, OutOfMemory
from tests.conftest import KernelProc
from tests.tinymodel import make_tiny_llama

LONG = {"max_new_tokens": 100000, "ignore_eos": True}


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    return str(make_tiny_llama(root / "a", seed=1)), str(make_tiny_llama(root / "b", seed=2))


@pytest.fixture(scope="module")
def capped():
    # each tiny model's estimate is ~351 MiB (mostly worker overhead): one fits under 600 MiB, two do not
    k = KernelProc(extra=["--memory-limit", "600M"])
    yield k
    k.stop()


def loaded(c):
    return {d["model"]: d for d in c.models()}


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


def test_a_pinned_model_stays_and_keep_alive_zero_unloads_after_use(capped, two_models):
    a, b = two_models
    with capped.client() as c:
        c.model_load(a, keep_alive=-1)
        with pytest.raises(OutOfMemory):
            c.wait(c.spawn(prompt="x", model=b, max_new_tokens=2))
        c.model_unload(a)
        c.wait(c.spawn(prompt="x", model=b, max_new_tokens=2, keep_alive=0))
        deadline = time.monotonic() + 10
        while b in loaded(c) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert loaded(c) == {}


def test_model_info_estimates_memory_before_loading(capped, two_models):
    with capped.client() as c:
        info = c.model_info(two_models[0])
        est = info["estimate"]
        assert info["loaded"] is False and est["parameters"] > 0
        assert est["total_bytes"] == est["weight_bytes"] + est["kv_bytes"] + est["overhead_bytes"]


def test_two_instances_share_the_work(kernel, tmp_path):
    path = str(make_tiny_llama(tmp_path / "c", seed=3))
    with kernel.client() as c:
        d = c.model_load(path, instances=2, kv_policy="dynamic", kv_blocks=16, kv_max_blocks=512)
        assert d["instances"] == 2 and len({e["worker_pid"] for e in d["executors"]}) == 2
        # both workers built (or found) the native CPU kernels; without a compiler they use torch's
        expected = "native" if shutil.which("cc") or shutil.which("gcc") else "torch"
        assert [e["kernels"] for e in d["executors"]] == [expected, expected]
        pids = [c.spawn(prompt=f"w{i}", model=path, **LONG) for i in range(4)]
        time.sleep(1.0)
        busy = [e for e in c.model_info(path)["executors"] if e["running"] > 0 or e["tokens_out"] > 0]
        assert len(busy) == 2
        for p in pids:
            c.kill(p, "KILL")
            c.wait(p)
        c.model_unload(path)


def test_metrics_report_batch_sizes_and_kv_blocks(client, tiny_model):
    pids = [client.spawn(prompt=f"m{i}", model=tiny_model, max_new_tokens=30, ignore_eos=True) for i in range(3)]
    for p in pids:
        client.wait(p)
    met = client.metrics()
    [ex] = [e for e in met["models"] if e["model"] == tiny_model]
    assert ex["steps"] > 0 and ex["batch_max"] >= 2 and ex["kv_total"] > 0 and ex["tokens_out"] >= 90
    assert ex["kv_used"] == 0  # every block came back
    assert met["finished"]["count"] >= 3 and met["finished"]["ttft_s"]["p50"] > 0


def test_kill_returns_every_kv_block_in_the_worker(client, tiny_model):
    pids = [client.spawn(prompt="k" * 50, model=tiny_model, **LONG) for _ in range(4)]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        [ex] = [e for e in client.metrics()["models"] if e["model"] == tiny_model]
        if ex["kv_used"] > 0 and ex["running"] == 4:
            break
        time.sleep(0.05)
    assert ex["kv_used"] > 0
    for i, p in enumerate(pids):
        client.kill(p, "KILL" if i % 2 else "TERM")
        client.wait(p)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        [ex] = [e for e in client.metrics()["models"] if e["model"] == tiny_model]
        if ex["kv_used"] == 0:
            break
        time.sleep(0.05)
    assert ex["kv_used"] == 0 and ex["kv_free"] == ex["kv_total"]


def test_llmos_devices_works_without_a_gpu(kernel):
    r = subprocess.run([sys.executable, "-m", "llmos", "devices"], env=kernel.env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("cpu: ") and "gpus: none" in r.stdout
    devs = json.loads(subprocess.run([sys.executable, "-m", "llmos", "devices", "--json"], env=kernel.env,
                                     capture_output=True, text=True, timeout=60).stdout)
    assert [d["kind"] for d in devs] == ["cpu"] and devs[0]["cores_logical"] >= 1


def test_bad_load_options_are_refused(client, tiny_model):
    client.wait(client.spawn(prompt="x", model=tiny_model, max_new_tokens=1))  # loaded, static policy
    with pytest.raises(InvalidArgument, match="no device 'cuda:7'"):
        client.model_load(tiny_model, device="cuda:7")
    with pytest.raises(InvalidArgument):
        client.model_load(tiny_model, kv_policy="greedy")
    with pytest.raises(Busy, match="unload it first"):
        client.model_load(tiny_model, kv_policy="dynamic")
    assert client.model_load(tiny_model)["loaded"] is True  # same options: it is just returned
