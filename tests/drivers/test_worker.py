"""The model worker's loop, in-process: a real engine and real ZeroMQ sockets, the kernel's end played by the test."""

import threading

import pytest
import zmq

from llmos.drivers.model.worker import Worker
from llmos.syscalls import codec


class Gate:
    """Holds every engine step until the test's go-ahead, so the test knows a step is in progress."""

    def __init__(self):
        self.stepping, self.go = threading.Event(), threading.Event()

    def wrap(self, load_engine):
        def load(*args, **kw):
            engine = load_engine(*args, **kw)
            real = engine.step

            def held():
                self.stepping.set()
                assert self.go.wait(30)
                return real()

            engine.step = held
            return engine

        return load


@pytest.fixture
def worker(tiny_model, tmp_path, monkeypatch):
    from llmos.drivers.model import engine

    gate = Gate()
    monkeypatch.setattr(engine, "load_engine", gate.wrap(engine.load_engine))
    ctx = zmq.Context.instance()
    kernel_end = ctx.socket(zmq.DEALER)
    kernel_end.setsockopt(zmq.LINGER, 0)
    kernel_end.setsockopt(zmq.RCVTIMEO, 30_000)
    address = f"ipc://{tmp_path}/w.sock"
    kernel_end.bind(address)
    w = Worker(address, tiny_model, "cpu", {"max_batch": 4})
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", w.serve()), daemon=True)
    thread.start()

    def recv():  # the next frame that is not a heartbeat
        while True:
            msg = codec.decode(kernel_end.recv())
            if msg["op"] != "hb":
                return msg

    assert recv()["op"] == "ready"
    yield w, gate, kernel_end, recv
    gate.go.set()
    kernel_end.send(codec.encode({"op": "shutdown"}))
    thread.join(30)
    assert not w.io.is_alive()
    w.sock.close(linger=0)
    kernel_end.close()
    assert result.get("rc") == 0


def test_a_prompt_is_encoded_while_a_step_is_in_progress(worker):
    w, gate, kernel, recv = worker
    kernel.send(codec.encode({"op": "add", "pid": 1, "ids": [5, 6, 7], "params": {"max_new_tokens": 2}}))
    assert gate.stepping.wait(30)  # the main thread is now inside a step, held there
    kernel.send(codec.encode({"op": "encode", "rid": 9, "prompt": "hello", "messages": None, "prompt_ids": None}))
    reply = recv()
    assert reply["op"] == "encoded" and reply["rid"] == 9 and reply["ids"] == w.engine.encode("hello")
    assert not gate.go.is_set()  # answered with the step still held
    gate.go.set()
    steps = []
    while not steps or steps[-1]["events"][0][3] is None:
        msg = recv()
        if msg["op"] == "step":
            steps.append(msg)
    assert steps[-1]["events"][0][0] == 1 and steps[-1]["events"][0][3] == "length"


def test_a_bad_prompt_gets_an_error_reply_from_the_socket_thread(worker):
    w, gate, kernel, recv = worker
    kernel.send(codec.encode({"op": "encode", "rid": 3, "prompt": None, "messages": None, "prompt_ids": [-1]}))
    reply = recv()
    assert reply["rid"] == 3 and reply["error"] == "EINVAL"
