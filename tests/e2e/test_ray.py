"""The Ray backend on a real local Ray: model instances as Ray actors, placed by Ray, behind the same executor contract.

One kernel started with ``--ray`` (it starts a local Ray) serves the single-node tests; a two-node
``ray.cluster_utils.Cluster`` (two simulated nodes: two raylets on this machine) serves placement and node
failure, with a kernel that joins it. Marked ``ray`` (its own step of .ci/run): Ray and its actors take tens of
seconds to start on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import KernelProc, wait_for
from tests.tinymodel import make_tiny_llama

ray = pytest.importorskip("ray", reason="the Ray backend's tests need ray: pip install 'llmos[ray]'")
pytestmark = pytest.mark.ray

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPTS = ("the kernel", "x", "once upon a time", "ray actors")
PLACEMENT_S = 15
CLUSTER_PLACEMENT_S = 5


@pytest.fixture(scope="module", autouse=True)
def ray_tmpdir():
    """Every Ray these tests start (the kernels', the cluster's) keeps its session files in a directory removed after
    them, instead of leaving /tmp/ray/session_* behind (a short path: Ray's unix sockets live under it)."""
    import tempfile

    path = tempfile.mkdtemp(prefix="llmos-ray-", dir="/tmp")
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = path
    yield path
    if old is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = old
    shutil.rmtree(path, ignore_errors=True)


def model_actors() -> list[psutil.Process]:
    """The Ray worker processes running a ModelActor on this machine (Ray names them ``ray::ModelActor...``)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any("ray::ModelActor" in part for part in (p.info["cmdline"] or [])):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two copies of one tiny long-context model (the same weights at two paths: one loaded on each backend)."""
    base = tmp_path_factory.mktemp("ray-models")
    first = make_tiny_llama(base / "on-local", seed=7, context=100_000)
    second = base / "on-ray"
    shutil.copytree(first, second)
    return str(first), str(second)


@pytest.fixture(scope="module")
def ray_kernel(models):
    # the local Ray has this machine's CPUs (2 here): the module's model takes one of them in two instances
    # with a CURVE tcp listener too: the bus's ZAP domain and the actors' share one ZAP handler
    k = KernelProc(max_batch=8, tcp=True, extra=["--ray", "--ray-placement-timeout", str(PLACEMENT_S)])
    local, on_ray = models
    try:
        with k.client() as c:
            c.model_load(local, kv_blocks=4096, keep_alive=-1)
            c.model_load(on_ray, backend="ray", instances=2, num_cpus=0.5, kv_blocks=4096, keep_alive=-1)
    except BaseException:  # a setup that fails leaves no kernel (nor its home) behind
        k.stop()
        raise
    yield k
    with k.client() as c:  # llmos kernel stop leaves none of its actors
        actors = [e["worker_pid"] for d in c.models() for e in d["executors"] if e["backend"] == "ray"]
    assert actors and all(psutil.pid_exists(pid) for pid in actors)
    k.stop()
    assert k.proc.returncode == 0, k.logs()
    wait_for(lambda: not any(psutil.pid_exists(pid) for pid in actors), timeout=20, what="the kernel's actors to end")


def run_all(c, model: str, n: int) -> dict[str, list[int]]:
    pids = {p: c.spawn(prompt=p, model=model, max_new_tokens=n, **GREEDY) for p in PROMPTS}
    return {p: c.wait(pid, timeout=120).token_ids for p, pid in pids.items()}


def test_a_model_on_the_ray_backend_runs_in_ray_actors_and_generates_what_the_local_backend_does(ray_kernel, models):
    local, on_ray = models
    with ray_kernel.client() as c:
        info = c.model_info(on_ray)
        assert info["backend"] == "ray" and info["ray"] == {"num_cpus": 0.5, "num_gpus": 0.0, "placement": "spread"}
        exs = info["executors"]
        assert len(exs) == 2 and all(e["backend"] == "ray" and e["ready"] for e in exs)
        assert all(e["node"].startswith("ray:") and e["node_id"] for e in exs)
        # the actors are Ray's worker processes (a raylet's children), not worker processes of the kernel's
        assert {e["worker_pid"] for e in exs} <= {p.pid for p in model_actors()}
        assert all("raylet" in psutil.Process(e["worker_pid"]).parent().name() for e in exs)
        assert c.model_info(local)["executors"][0]["backend"] == "local"
        assert run_all(c, on_ray, 40) == run_all(c, local, 40)
        with ray_kernel.client_as("ray-tcp-user") as u:  # a user over CURVE tcp, on the Ray instances
            assert u.kernel["user"] == "ray-tcp-user"
            assert u.wait(u.spawn(prompt="x", model=on_ray, max_new_tokens=5, **GREEDY)).finish_reason == "length"
        # the cluster's node is a device, from Ray's view
        [node] = [d for d in c.devices() if d["kind"] == "node"]
        assert node["node_id"] == exs[0]["node_id"] and node["cpus"] >= 2 and node["memory_total_bytes"] > 0
        assert set(node["holders"]) == {f"{on_ray}#0", f"{on_ray}#1"}
        assert c.kernel_info()["ray"]["started_local"] is True


def test_an_actor_killed_mid_run_loses_nothing_its_processes_resume_greedy_identical(ray_kernel, models):
    local, on_ray = models
    n = 1000
    with ray_kernel.client() as c:
        want = run_all(c, local, n)
        pids = {p: c.spawn(prompt=p, model=on_ray, max_new_tokens=n, **GREEDY) for p in PROMPTS}
        wait_for(lambda: all(c.stat(pid).output_tokens > 20 for pid in pids.values()), timeout=60,
                 what="every process to generate")
        victim = c.model_info(on_ray)["executors"][0]
        os.kill(victim["worker_pid"], signal.SIGKILL)
        assert all(c.stat(pid).output_tokens < n for pid in pids.values()), "the kill came after the run"
        got = {p: c.wait(pid, timeout=120) for p, pid in pids.items()}
        assert all(r.finish_reason == "length" for r in got.values())
        assert {p: r.token_ids for p, r in got.items()} == want
        # the dead actor was replaced: two ready Ray instances again, and the kernel kept serving
        wait_for(lambda: [e["ready"] for e in c.model_info(on_ray)["executors"]] == [True, True], timeout=60,
                 what="a new instance in the dead one's place")
        assert victim["worker_pid"] not in {e["worker_pid"] for e in c.model_info(on_ray)["executors"]}
        c.ping()


def llmos(k: KernelProc, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmos", *argv], env=k.env, capture_output=True, text=True,
                          timeout=120)


def test_the_cli_loads_on_ray_and_shows_the_nodes_and_where_each_instance_runs(ray_kernel, tmp_path):
    model = str(make_tiny_llama(tmp_path / "cli-model", seed=3))
    out = llmos(ray_kernel, "load", model, "--backend", "ray", "--num-cpus", "1", "--placement", "pack", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["backend"] == "ray" and d["ray"]["placement"] == "pack" and d["executors"][0]["node"].startswith("ray:")
    node = d["executors"][0]["node"]
    devices = llmos(ray_kernel, "devices")
    assert devices.returncode == 0 and node in devices.stdout and "(head)" in devices.stdout
    assert f"{model}#0" in devices.stdout  # the instance is listed under its node
    status = llmos(ray_kernel, "kernel", "status")
    assert "Ray: " in status.stdout and f"ray worker pid {d['executors'][0]['worker_pid']}, node {node}" in status.stdout
    run = llmos(ray_kernel, "run", "--model", model, "--temperature", "0", "--max-new-tokens", "5", "hello")
    assert run.returncode == 0, run.stderr
    bad = llmos(ray_kernel, "load", model, "--backend", "ray", "--num-gpus", "1")
    assert bad.returncode == 1 and bad.stderr.startswith("llmos: [EBUSY]") and "Traceback" not in bad.stderr
    assert llmos(ray_kernel, "unload", model).returncode == 0


def test_ray_load_errors_are_named_at_once(ray_kernel, models):
    from llmos.syscalls.errors import InvalidArgument, OutOfMemory

    _, on_ray = models
    model = str(make_tiny_llama(ray_kernel.home / "other-model"))
    with ray_kernel.client() as c:
        [node] = [d for d in c.devices() if d["kind"] == "node"]
        # more CPUs than any node has (and, where the node has none, a GPU): refused at once, not left waiting for Ray
        t = time.monotonic()
        for ask in [{"num_cpus": node["cpus"] + 1}] + ([{"num_gpus": 1}] if not node["gpus"] else []):
            with pytest.raises(OutOfMemory, match="no Ray node can hold one instance"):
                c.model_load(model, backend="ray", **ask)
        assert time.monotonic() - t < 10
        with pytest.raises(InvalidArgument, match="backend='ray'"):
            c.model_load(model, num_cpus=2)
        with pytest.raises(InvalidArgument, match="device cuda with num_gpus 0"):
            c.model_load(model, backend="ray", device="cuda", num_gpus=0)
        # the node could hold it, but the module's model holds some of its CPUs: Ray waits; the load fails once
        # --ray-placement-timeout passes
        t = time.monotonic()
        cpus = f"{node['cpus']:g}"
        with pytest.raises(OutOfMemory, match=f"Ray placed no instance .* in {PLACEMENT_S} s: no node has {cpus} CPU"):
            c.model_load(model, backend="ray", num_cpus=node["cpus"])
        assert PLACEMENT_S <= time.monotonic() - t < PLACEMENT_S + 10
        assert model not in [m["model"] for m in c.models()]
        # and the same load options again are not "other options" (the device of a Ray instance is cpu or cuda)
        c.model_load(model, backend="ray", device="cpu", num_cpus=0.5)
        assert c.model_load(model, backend="ray", device="cpu", num_cpus=0.5)["ray"]["num_cpus"] == 0.5
        c.model_unload(model)
        c.ping()


def test_a_kernel_killed_with_9_leaves_no_actor(models, tmp_path):
    k = KernelProc(extra=["--ray"])
    try:
        with k.client() as c:
            c.model_load(str(make_tiny_llama(tmp_path / "m")), backend="ray", num_cpus=1)
            [ex] = c.model_info(str(tmp_path / "m"))["executors"]
        assert psutil.pid_exists(ex["worker_pid"])
        k.crash()
        # the kernel was the driver that owned the actor (and the Ray it started): Ray ends both
        wait_for(lambda: not psutil.pid_exists(ex["worker_pid"]), timeout=30, what="the actor to end")
    finally:
        k.stop()


# -- two simulated nodes ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    c.worker = c.add_node(num_cpus=2)
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def cluster_kernel(cluster):
    k = KernelProc(max_batch=8, extra=["--ray", cluster.address, "--ray-placement-timeout", str(CLUSTER_PLACEMENT_S)])
    yield k
    k.stop()
    assert k.proc.returncode == 0, k.logs()


def nodes_of(c, model: str) -> list[str]:
    return [e["node_id"] for e in c.model_info(model)["executors"]]


def test_spread_places_one_instance_per_node_and_pack_puts_both_on_one(cluster_kernel, models):
    _, on_ray = models
    with cluster_kernel.client() as c:
        nodes = [d for d in c.devices() if d["kind"] == "node"]
        assert len(nodes) == 2 and sum(1 for n in nodes if n["head"]) == 1
        assert c.kernel_info()["ray"]["started_local"] is False
        for placement, distinct in (("spread", 2), ("pack", 1)):
            # Ray frees a removed placement group's resources a moment later: pack only once they are back
            wait_for(lambda: all(n["cpus_free"] == n["cpus"] for n in c.devices() if n["kind"] == "node"),
                     timeout=30, what="every node's CPUs free")
            c.model_load(on_ray, backend="ray", instances=2, num_cpus=1, placement=placement, kv_blocks=512)
            assert len(set(nodes_of(c, on_ray))) == distinct, placement
            c.model_unload(on_ray)


def test_a_node_that_dies_mid_run_loses_nothing_and_the_survivor_serves_on(cluster, cluster_kernel, models):
    local, on_ray = models
    n = 1500
    with cluster_kernel.client() as c:
        c.model_load(local, kv_blocks=4096)
        want = run_all(c, local, n)
        # one instance per node, each taking all of its node's CPUs: the dead node's instance has nowhere to go
        wait_for(lambda: all(n["cpus_free"] == n["cpus"] for n in c.devices() if n["kind"] == "node"),
                 timeout=30, what="every node's CPUs free")
        c.model_load(on_ray, backend="ray", instances=2, num_cpus=2, placement="spread", kv_blocks=4096)
        head = next(d["node_id"] for d in c.devices() if d["kind"] == "node" and d["head"])
        assert head in nodes_of(c, on_ray) and len(set(nodes_of(c, on_ray))) == 2
        pids = {p: c.spawn(prompt=p, model=on_ray, max_new_tokens=n, **GREEDY) for p in PROMPTS}
        wait_for(lambda: all(c.stat(pid).output_tokens > 20 for pid in pids.values()), timeout=60,
                 what="every process to generate")
        cluster.remove_node(cluster.worker, allow_graceful=False)
        # the kernel does not wait on the dead node: Ray's view of the nodes, and a spawn elsewhere, answer at once
        t = time.monotonic()
        c.devices()
        assert c.wait(c.spawn(prompt="x", model=local, max_new_tokens=4, **GREEDY), timeout=30).finish_reason == "length"
        assert time.monotonic() - t < 5.0, "the kernel blocked on the dead node"
        got = {p: c.wait(pid, timeout=180) for p, pid in pids.items()}
        assert all(r.finish_reason == "length" for r in got.values())
        assert {p: r.token_ids for p, r in got.items()} == want
        # the lost instance cannot be placed again (the node left is full): it keeps waiting for room, past several
        # --ray-placement-timeouts, and the model keeps serving on the survivor instead of being unloaded
        time.sleep(3 * CLUSTER_PLACEMENT_S)
        exs = c.model_info(on_ray)["executors"]
        assert sorted(e["ready"] for e in exs) == [False, True] and [e["node_id"] for e in exs if e["ready"]] == [head]
        assert c.wait(c.spawn(prompt="y", model=on_ray, max_new_tokens=8, **GREEDY), timeout=60).finish_reason == "length"
        c.model_unload(on_ray)
        c.model_unload(local)


def test_a_kernel_killed_with_9_leaves_no_actor_on_the_cluster_it_joined(cluster, tmp_path):
    k = KernelProc(extra=["--ray", cluster.address])
    try:
        model = str(make_tiny_llama(tmp_path / "m"))
        with k.client() as c:
            c.model_load(model, backend="ray", num_cpus=1)
            [ex] = c.model_info(model)["executors"]
        k.crash()
        # the cluster lives on; the kernel's job ended, and Ray ends the actors it owned
        wait_for(lambda: not psutil.pid_exists(ex["worker_pid"]), timeout=60, what="the actor to end")
    finally:
        k.stop()
