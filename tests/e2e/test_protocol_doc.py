"""A client written from docs/protocol.md alone (raw ZeroMQ + MessagePack) can do a whole job."""

import os
import pwd
import re
import subprocess
import sys
from pathlib import Path

import msgpack
import zmq
import zmq.auth

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def test_the_example_session_in_protocol_md_runs_as_written(kernel, tiny_model):
    [code] = re.findall(r"## Example session.*?```python\n(.*?)```", DOC.read_text(), re.S)
    assert "s.poll(" in code and "s.recv()" in code  # it never blocks on recv without a timeout
    code = code.replace('ADDRESS = "ipc:///home/me/.llmos/run/kernel.sock"', f"ADDRESS = {kernel.address!r}")
    code = code.replace('model="default"', f"model={tiny_model!r}")
    # the doc's user "me" (of /home/me) stands for the reader's account, as its address does: hello may name
    # only the user the transport proves, here this process's uid
    code = code.replace('user="me"', f"user={pwd.getpwuid(os.getuid()).pw_name!r}")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "'version': 1" in lines[0] and lines[-2].strip() in ("length", "stop")
    assert "'output_tokens': " in lines[-1] and "'prompt_tokens': " in lines[-1]


def test_a_raw_client_can_hello_spawn_stream_and_wait(kernel, tiny_model):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.RCVTIMEO, 30_000)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(kernel.address)

    def call(i, name, **args):
        s.send(msgpack.packb({"v": 1, "id": i, "call": name, "args": args}))

    try:
        call(1, "hello", version=1, client="raw")
        hello = msgpack.unpackb(s.recv())["result"]
        assert hello["version"] == 1 and hello["user"] == "root" and hello["transport"] == "ipc"  # this process's uid
        call(2, 10, prompt="raw", model=tiny_model, max_new_tokens=5, temperature=0, ignore_eos=True)
        pid = msgpack.unpackb(s.recv())["result"]["pid"]
        call(3, "stream", pid=pid)
        chunks = []
        while (f := msgpack.unpackb(s.recv()))["t"] == "chunk":
            assert f["id"] == 3
            chunks.append(f["data"])
        assert f["t"] == "ok" and f["result"]["finish_reason"] == "length"
        assert sum(len(c["token_ids"]) for c in chunks) == 5
        call(4, "wait", pid=pid)
        assert msgpack.unpackb(s.recv())["result"]["stats"]["output_tokens"] == 5
    finally:
        s.close()
        ctx.term()


def test_another_users_process_cannot_be_killed(kernel, long_model, client):
    # long_model: the process is still running when mallory tries, so "the kill did nothing" can be seen
    pid = client.spawn(prompt="mine", model=long_model, max_new_tokens=50_000, ignore_eos=True)
    ctx = zmq.Context()

    def dealer(address, curve=None):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.RCVTIMEO, 30_000)
        s.setsockopt(zmq.LINGER, 0)
        if curve:  # (the kernel's public key file, the client's secret key file)
            s.curve_serverkey = zmq.auth.load_certificate(curve[0])[0]
            s.curve_publickey, s.curve_secretkey = zmq.auth.load_certificate(curve[1])
        s.connect(address)
        return s

    def call(s, i, name, **args):
        s.send(msgpack.packb({"v": 1, "id": i, "call": name, "args": args}))
        return msgpack.unpackb(s.recv())

    ipc = dealer(kernel.address)
    mallory = dealer(kernel.tcp, kernel._keys_of("mallory"))  # a CURVE key the admin authorised for mallory
    try:
        # over ipc the kernel knows this process by its uid: saying "mallory" there is refused, not believed
        r = call(ipc, 1, "hello", version=1, user="mallory")
        assert (r["t"], r["error"]) == ("err", "EPERM"), r
        r = call(mallory, 1, "hello", version=1, user="mallory")
        assert r["t"] == "ok" and r["result"]["user"] == "mallory" and not r["result"]["admin"], r
        r = call(mallory, 2, "kill", pid=pid, signal="KILL")
        assert (r["t"], r["error"]) == ("err", "EPERM"), r
        assert client.stat(pid).state != "ZOMBIE"  # the refused kill did nothing
    finally:
        ipc.close()
        mallory.close()
        ctx.term()
        client.kill(pid, "KILL")
        client.wait(pid)
