"""The model worker's loop, in-process: a real engine and real ZeroMQ sockets, the kernel's end played by the test."""

import threading
import time

import pytest
import zmq

from llmos.drivers.model.worker import Worker
from llmos.syscalls import codec
from llmos.syscalls.errors import quote


class Gate:
    """Holds every engine step until the test's go-ahead, so the test knows a step is in progress."""

    def __init__(self):
        self.stepping, self.go = threading.Event(), threading.Event()

    def __call__(self, engine):
        real = engine.step

        def held():
            self.stepping.set()
            assert self.go.wait(30)
            return real()

        engine.step = held


@pytest.fixture
def start_worker(tiny_model, tmp_path, monkeypatch):
    """Start a worker thread on the tiny model, with ``patch(engine)`` applied once it is loaded; returns
    (worker, kernel-end socket, recv) where recv() gives the next frame that is not a heartbeat."""
    from llmos.drivers.model import engine

    started = []
    ctx = zmq.Context.instance()

    def start(patch=lambda engine: None):
        def load(*args, **kw):
            e = real_load(*args, **kw)
            patch(e)
            return e

        real_load = engine.load_engine
        monkeypatch.setattr(engine, "load_engine", load)
        kernel_end = ctx.socket(zmq.DEALER)
        kernel_end.setsockopt(zmq.LINGER, 0)
        kernel_end.setsockopt(zmq.RCVTIMEO, 30_000)
        address = f"ipc://{tmp_path}/w{len(started)}.sock"
        kernel_end.bind(address)
        w = Worker(address, tiny_model, "cpu", {"max_batch": 4})
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("rc", w.serve()), daemon=True)
        thread.start()

        def recv():
            while True:
                msg = codec.decode(kernel_end.recv())
                if msg["op"] != "hb":
                    return msg

        assert recv()["op"] == "ready"
        started.append((w, kernel_end, thread, result))
        return w, kernel_end, recv

    yield start
    for w, kernel_end, thread, result in started:
        kernel_end.send(codec.encode({"op": "shutdown"}))
        thread.join(30)
        assert not w.io.is_alive()
        w.sock.close(linger=0)
        kernel_end.close()
        assert result.get("rc") == 0


@pytest.fixture
def worker(start_worker):
    gate = Gate()
    w, kernel_end, recv = start_worker(gate)
    yield w, gate, kernel_end, recv
    gate.go.set()


def test_a_prompt_is_encoded_while_a_step_is_in_progress(worker):
    w, gate, kernel, recv = worker
    kernel.send(codec.encode({"op": "add", "pid": 1, "prompt_ids": [5, 6, 7], "params": {"max_new_tokens": 2}}))
    assert gate.stepping.wait(30)  # the main thread is now inside a step, held there
    kernel.send(codec.encode({"op": "encode", "rid": 9, "prompt": "hello", "messages": None, "prompt_ids": None}))
    reply = recv()
    assert reply["op"] == "encoded" and reply["rid"] == 9 and reply["ids"] == w.engine.encode("hello")
    assert not gate.go.is_set()  # answered with the step still held
    gate.go.set()
    steps = []
    while not steps or steps[-1]["events"][0].get("finish_reason") is None:
        msg = recv()
        if msg["op"] == "step":
            steps.append(msg)
    assert steps[-1]["events"][0]["pid"] == 1 and steps[-1]["events"][0]["finish_reason"] == "length"


def test_a_bad_prompt_gets_an_error_reply_from_the_socket_thread(worker):
    w, gate, kernel, recv = worker
    kernel.send(codec.encode({"op": "encode", "rid": 3, "prompt": None, "messages": None, "prompt_ids": [-1]}))
    reply = recv()
    assert reply["rid"] == 3 and reply["error"] == "EINVAL"


def test_abort_for_a_pid_the_engine_never_heard_of_still_answers_a_final_killed_event(start_worker):
    w, kernel, recv = start_worker()
    kernel.send(codec.encode({"op": "abort", "pid": 77}))
    msg = recv()
    assert msg["op"] == "step" and msg["events"] == [{"pid": 77, "finish_reason": "killed", "final_text": "",
                                                      "error": None}]


def test_a_worker_with_nothing_runnable_sleeps_and_sends_no_step_frames(start_worker):
    calls = []

    def stalled(engine):  # a sequence waits for memory no one can give: each step runs nothing
        def step():
            calls.append(time.monotonic())
            engine.last_step_tokens = 0
            return []

        engine.step = step

    w, kernel, recv = start_worker(stalled)
    kernel.send(codec.encode({"op": "add", "pid": 1, "prompt_ids": [5, 6, 7], "params": {"max_new_tokens": 2}}))
    frames = []
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        if kernel.poll(100):
            frames.append(codec.decode(kernel.recv()))
    assert 1 <= len(calls) <= 4  # one try, then one a heartbeat (1 s) later: no spinning
    assert frames and all(f["op"] == "hb" and f["running"] == 1 for f in frames)  # alive, and silent otherwise
    kernel.send(codec.encode({"op": "abort", "pid": 1}))  # an op wakes it at once
    assert recv()["events"][0]["finish_reason"] == "killed"


def load_failure(tmp_path, model):
    """The first frame a worker sends the kernel on ``model``: "failed" when it cannot load it (a worker
    that loads it after all is shut down, so that the test fails instead of hanging)."""
    ctx = zmq.Context.instance()
    kernel_end = ctx.socket(zmq.DEALER)
    kernel_end.setsockopt(zmq.LINGER, 0)
    kernel_end.setsockopt(zmq.RCVTIMEO, 60_000)
    kernel_end.bind(f"ipc://{tmp_path}/w.sock")
    w = Worker(f"ipc://{tmp_path}/w.sock", str(model), "cpu", {})
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", w.serve()), daemon=True)
    thread.start()
    try:
        while (msg := codec.decode(kernel_end.recv()))["op"] == "hb":  # the load stages, before the outcome
            pass
        if msg["op"] != "failed":
            kernel_end.send(codec.encode({"op": "shutdown"}))
        thread.join(30)
    finally:
        if w.io is None or not w.io.is_alive():
            w.sock.close(linger=0)
        kernel_end.close()
    assert msg["op"] != "failed" or result["rc"] == 1
    return msg


@pytest.mark.parametrize("config, fault", [('{"model_type": "no-such-architecture"}', "ValueError"),
                                           ('{"model_type": "llama", "vocab_size": 8}', "")])
def test_a_model_the_loader_refuses_for_its_files_is_reported_as_einval(tmp_path, config, fault):
    model = tmp_path / "bad"
    model.mkdir()
    (model / "config.json").write_text(config)  # no tokenizer, no weights
    msg = load_failure(tmp_path, model)
    assert msg["op"] == "failed" and msg["errno"] == 22 and fault in msg["message"]
    assert f"cannot load model {quote(str(model))}: " in msg["message"]


def test_a_tokenizer_with_implausibly_few_tokens_is_refused_at_load_naming_the_directory(tmp_path):
    from tests.tinymodel import make_tiny_gpt2

    model = make_tiny_gpt2(tmp_path / "g" / ("long-directory-name-" * 4))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    (model / "vocab.json").write_text("{}")  # files there, but empty: transformers builds a GPT2Tokenizer of 1 token
    (model / "merges.txt").write_text("#version: 0.2\n")
    msg = load_failure(tmp_path, model)
    assert msg["op"] == "failed" and msg["error"] == "EINVAL", msg
    assert msg["message"].startswith(f"cannot load model {quote(str(model))}: its tokenizer (GPT2Tokenizer) has 1 "
                                     "tokens for a model of 261: the tokenizer's files in the model directory")
    assert len(msg["message"]) < 400


@pytest.mark.parametrize("changes, fault", [({"rms_norm_eps": "abc"}, "rms_norm_eps"),
                                            ({"hidden_size": 30}, "hidden size"),  # 4 heads do not divide it
                                            ({"tie_word_embeddings": "x"}, "tie_word_embeddings")])
def test_a_config_value_transformers_refuses_is_reported_as_einval_naming_it(tmp_path, tiny_model, changes, fault):
    import json
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **changes}))
    msg = load_failure(tmp_path, model)
    assert msg["op"] == "failed" and msg["error"] == "EINVAL" and fault in msg["message"], msg


def test_a_worker_process_runs_add_preempt_resume_append_and_abort_over_its_socket(tiny_model, tmp_path):
    """A real worker process and socket, the kernel's end played by the test with protocol.py messages."""
    import subprocess
    import sys

    from llmos.drivers.model import protocol as p
    from llmos.drivers.model.engine import load_engine

    ref_engine = load_engine(tiny_model, engine="paged", block_size=4, num_blocks=64, measure=False)
    prompt = ref_engine.encode("worker")
    greedy = {"temperature": 0.0, "ignore_eos": True, "max_new_tokens": 40}
    ref_engine.add(1, prompt, greedy)
    ref = []
    while ref_engine.has_work():
        ref += [t for ev in ref_engine.step() for t in ev.token_ids]
    ctx = zmq.Context.instance()
    kernel = ctx.socket(zmq.DEALER)
    kernel.setsockopt(zmq.LINGER, 0)
    kernel.setsockopt(zmq.RCVTIMEO, 60_000)
    address = f"ipc://{tmp_path}/proc.sock"
    kernel.bind(address)
    proc = subprocess.Popen([sys.executable, "-m", "llmos.drivers.model.worker", "--address", address,
                             "--model", tiny_model, "--device", "cpu", "--options", '{"block_size": 4, "num_blocks": 64}'])
    try:
        def send(msg):
            kernel.send(codec.encode(msg.to_wire()))

        def events_until(pid, pred):
            """Events for ``pid`` from step frames until one satisfies ``pred``."""
            out = []
            while not out or not pred(out[-1]):
                msg = p.from_wire(codec.decode(kernel.recv()))
                if isinstance(msg, p.Step):
                    out += [ev for ev in msg.events if ev.pid == pid]
            return out

        stages = []  # the load stages the worker reports before Ready (model_info's executors[].stage)
        while isinstance(ready := p.from_wire(codec.decode(kernel.recv())), p.Heartbeat):
            stages.append(ready.stats["stage"])
        assert stages == ["importing torch and transformers", "reading weights", "building the KV pool"]
        assert isinstance(ready, p.Ready) and ready.info["swap_blocks"] == ready.info["kv_blocks"]
        send(p.Add(7, prompt, greedy, user="ann", session=True))
        turn = events_until(7, lambda ev: ev.token_ids)
        send(p.Preempt(7, "swap"))
        turn += events_until(7, lambda ev: ev.preempted is not None or ev.finish_reason is not None)
        assert turn[-1].preempted == "swap"  # 40 tokens take far longer than the preempt's trip
        send(p.Resume(7, 0))
        turn += events_until(7, lambda ev: ev.finish_reason is not None)
        assert [t for ev in turn for t in ev.token_ids] == ref and turn[-1].finish_reason == "length"
        reply = [t for ev in turn for t in ev.token_ids]
        send(p.Append(7, prompt + reply + [5, 6, 7], {"temperature": 0.0, "max_new_tokens": 3}))
        send(p.Renice(7, 3))
        send(p.Resume(7, 3))
        turn2 = events_until(7, lambda ev: ev.finish_reason is not None)
        assert sum(ev.prefilled for ev in turn2) == 4 and sum(len(ev.token_ids) for ev in turn2) == 3
        send(p.Abort(7))
        last = events_until(7, lambda ev: ev.finish_reason is not None)[-1]
        assert last.finish_reason == "killed" and last.final_text == turn2[-1].final_text
        send(p.Shutdown())
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kernel.close()


def test_a_worker_watching_its_kernel_over_curve_tcp_exits_once_the_kernel_is_gone(tiny_model, monkeypatch):
    """A Ray actor's worker (tcp, CURVE, no parent-death signal): it serves while the kernel's socket is there and
    exits once the connection has been down KERNEL_LOST_S."""
    from llmos.drivers.model import worker as worker_mod

    monkeypatch.setattr(worker_mod, "KERNEL_LOST_S", 1.0)
    ctx = zmq.Context.instance()
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    kernel_end = ctx.socket(zmq.DEALER)
    kernel_end.setsockopt(zmq.LINGER, 0)
    kernel_end.setsockopt(zmq.RCVTIMEO, 30_000)
    kernel_end.curve_secretkey, kernel_end.curve_publickey, kernel_end.curve_server = server_secret, server_public, True
    port = kernel_end.bind_to_random_port("tcp://127.0.0.1")
    w = Worker(f"tcp://127.0.0.1:{port}", tiny_model, "cpu", {"max_batch": 4}, watch_kernel=True,
               curve={"server_key": server_public.decode(), "public_key": client_public.decode(),
                      "secret_key": client_secret.decode()})
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", w.serve()), daemon=True)
    thread.start()
    ops = []
    while "ready" not in ops:
        ops.append(codec.decode(kernel_end.recv())["op"])
    time.sleep(2.5)  # connected: past KERNEL_LOST_S it still serves (heartbeats come through)
    assert thread.is_alive() and codec.decode(kernel_end.recv())["op"] == "hb"
    kernel_end.close()
    t = time.monotonic()
    thread.join(15)
    assert not thread.is_alive() and result["rc"] == 2
    assert 1.0 <= time.monotonic() - t < 5.0
    w.sock.close(linger=0)
