"""The kernel and its model workers: floods, undeliverable messages, signals that must reach the worker,
liveness, and prompts too big to tokenise. Real ZeroMQ sockets and real worker processes throughout."""

import asyncio
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from llmos import InvalidArgument
from llmos.kernel import messages as m
from llmos.kernel.actor import Actor
from llmos.kernel.executor import BYTES_PER_S, Executor
from llmos.drivers.model import protocol as wp
from llmos.syscalls import protocol
from llmos.syscalls.errors import FrameTooLarge, TooBig
from tests.conftest import KernelProc, wait_for

# A stand-in worker process: it speaks the worker protocol over a real DEALER socket and then either
# floods the kernel (mode "frames": empty step frames; "bytes": 1 MiB heartbeats), answers each add
# with a one-token "length" event (mode "echo"), or reports a load failure blamed on the files ("fail").
FAKE_WORKER = r'''
import argparse, msgpack, zmq
ap = argparse.ArgumentParser()
for flag in ("--address", "--model", "--options", "--device", "--mode"):
    ap.add_argument(flag)
a = ap.parse_args()
sock = zmq.Context().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(a.address)
pack = lambda msg: msgpack.packb(msg, use_bin_type=True)
if a.mode == "fail":
    sock.send(pack({"op": "failed", "errno": 22, "message": "cannot load model: ValueError: no-such-architecture"}))
    sock.recv()  # until the kernel stops it
sock.send(pack({"op": "ready", "info": {"vocab_size": 100, "context_len": 64}}))
if a.mode == "frames":
    frame = pack({"op": "step", "events": [], "running": 1, "step_s": 1e-6, "steps": 1})
elif a.mode == "bytes":
    frame = pack({"op": "hb", "running": 0, "stats": {"pad": "x" * 2**20}})
while a.mode in ("frames", "bytes"):
    sock.send(frame)
while True:
    msg = msgpack.unpackb(sock.recv(), raw=False)
    if msg["op"] == "add":
        sock.send(pack({"op": "step", "events": [{"pid": msg["pid"], "token_ids": [1], "text": "x",
                                                   "finish_reason": "length", "final_text": "x", "error": None}],
                        "running": 0, "step_s": 0.001}))
'''


class Recorder(Actor):
    """Plays the ProcessManager: keeps every message an executor tells it."""

    def __init__(self):
        super().__init__("recorder")
        self.got = []

    async def receive(self, msg):
        self.got.append(msg)


async def start_executor(tmp_path: Path, mode: str, **limits) -> tuple[Executor, Recorder, zmq.asyncio.Context]:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    ctx = zmq.asyncio.Context()
    rec = Recorder().start()
    (tmp_path / "run").mkdir(exist_ok=True)
    ex = Executor(ctx, tmp_path / "run", "fake-model", rec, lambda ex: None, tmp_path, {"max_batch": 4}, **limits)
    ex.launch((sys.executable, str(script), "--mode", mode))
    await asyncio.wait([ex.ready], timeout=30)
    return ex, rec, ctx


async def stop_executor(ex: Executor, rec: Recorder, ctx: zmq.asyncio.Context) -> None:
    ex.proc.kill()  # the stand-in does not answer shutdown
    await ex.stop()
    await rec.stop()
    ctx.term()


async def loop_lag_while(seconds: float) -> float:
    """The longest the event loop took to wake a 10 ms sleeper during ``seconds``."""
    worst, end = 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.monotonic()
        await asyncio.sleep(0.01)
        worst = max(worst, time.monotonic() - t - 0.01)
    return worst


RATES = {"frames": {"frames_per_s": 300}, "bytes": {"bytes_per_s": 8 * 2**20}}


@pytest.mark.parametrize("mode", ["frames", "bytes"])
def test_a_worker_that_floods_is_read_at_its_allowance_and_the_kernel_loop_stays_responsive(tmp_path, mode):
    async def main():
        ex, rec, ctx = await start_executor(tmp_path, mode, **RATES[mode])
        try:
            t0, frames0, bytes0 = time.monotonic(), ex.frames_in, ex.bytes_in
            lag = await loop_lag_while(1.5)
            t_ask = time.monotonic()
            ids = await (await ex.ask(m.Encode(None, None, [1, 2, 3])))  # the executor's mailbox answers at once
            ask_s = time.monotonic() - t_ask
            elapsed = time.monotonic() - t0
            taken = ex.frames_in - frames0 if mode == "frames" else (ex.bytes_in - bytes0) / 2**20
            return taken, elapsed, lag, ask_s, ids
        finally:
            await stop_executor(ex, rec, ctx)

    taken, elapsed, lag, ask_s, ids = asyncio.run(main())
    if mode == "frames":  # empty step frames: 300 a second after a burst of 300 (and one in hand)
        assert 100 < taken <= 300 * elapsed + 300 + 2
    else:  # 1 MiB frames, in MiB: 8 a second after a burst of one largest frame (16)
        assert 4 < taken <= 8 * elapsed + 16 + 2
    assert lag < 0.3 and ask_s < 0.3 and ids == [1, 2, 3]


def test_the_byte_allowance_bounds_a_flood_of_large_frames():
    from llmos.kernel.executor import TokenBucket

    clock = [0.0]
    burst = protocol.MAX_FRAME_BYTES
    bucket = TokenBucket(BYTES_PER_S, burst, clock=lambda: clock[0])
    for _ in range(200):  # 200 MiB of frames, the reader sleeping as long as it is told
        clock[0] += bucket.delay(2**20)
    assert clock[0] == pytest.approx((200 * 2**20 - burst) / BYTES_PER_S, rel=0.01)
    clock[0] += 1000
    assert bucket.delay(2**20) == 0.0  # the allowance refills with time, up to the burst


def test_a_message_the_executor_cannot_deliver_ends_that_process_and_the_next_one_runs(tmp_path):
    async def main():
        ex, rec, ctx = await start_executor(tmp_path, "echo")
        try:
            huge = {"stop": ["s" * 6 * 2**20] * 3, "max_new_tokens": 1}  # each string under its bound, not all three
            ex.tell(wp.Add(7, [1, 2], huge))
            ex.tell(wp.Add(8, [1, 2], {"max_new_tokens": 1}))
            with pytest.raises(Exception) as err:
                await (await ex.ask(m.Encode(None, [{"role": "user", "content": "c" * 2**20}] * 20)))
            deadline = time.monotonic() + 10
            steps = lambda: [msg for msg in rec.got if isinstance(msg, m.StepEvents)]  # noqa: E731
            while len(steps()) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return err.value, [e for msg in steps() for e in msg.events], ex.dead
        finally:
            await stop_executor(ex, rec, ctx)

    encode_error, events, dead = asyncio.run(main())
    by_pid = {e.pid: e for e in events}
    assert by_pid[7].finish_reason == "error" and by_pid[7].error["error"] == "EMSGSIZE"
    assert "add" in by_pid[7].error["message"]
    assert by_pid[8].finish_reason == "length"  # the worker still serves the next one
    assert isinstance(encode_error, FrameTooLarge) and not dead


# -- through the shared kernel -------------------------------------------------------------------------------

def executor_of(client, model):
    [ex] = client.model_info(model)["executors"]
    return ex


def test_kill_reaches_the_worker_and_it_drops_the_sequence(client, long_model):
    pids = [client.spawn(prompt="k" * 40, model=long_model, max_new_tokens=90_000, ignore_eos=True)
            for _ in range(2)]
    wait_for(lambda: executor_of(client, long_model)["running"] == 2 and all(
        client.stat(p).output_tokens > 5 for p in pids), what="both processes generating")
    for p in pids:
        client.kill(p, "KILL")
        assert client.wait(p, timeout=10).finish_reason == "killed"
    ex = wait_for(lambda: (lambda e: e if e["running"] == 0 and e["kv_used"] == 0 else None)(
        executor_of(client, long_model)), timeout=10, what="the worker to drop both sequences")
    assert ex["kv_free"] == ex["kv_total"]


def test_ping_is_answered_at_once_while_a_long_prefill_runs(client, long_model):
    pid = client.spawn(prompt_ids=[5 + i % 200 for i in range(6000)], model=long_model, max_new_tokens=1)
    wait_for(lambda: client.stat(pid).state == "RUNNING", what="the prefill to start")
    times = []
    while client.stat(pid).output_tokens == 0 and len(times) < 400:  # ping all along the prefill
        t = time.monotonic()
        client.ping()
        times.append(time.monotonic() - t)
        time.sleep(0.005)
    client.kill(pid, "KILL")
    client.wait(pid)
    assert len(times) >= 20, "the prefill ended too soon to show anything: make the prompt longer"
    assert max(times) < 0.2, sorted(times)[-3:]


# On the long model (context 100,000; at most 1,200,000 characters): the first 400,000 characters of this prompt
# are 33,337 tokens, no proof that it cannot fit, so the worker tokenises all of it (1,895,334 tokens: a byte each,
# ~2 s) before E2BIG.
FULLY_TOKENISED = "<|im_start|>" * 33_334 + "中文 " * 266_000


def worker_rss(client, model):
    import psutil

    [pid] = [m["worker_pid"] for m in client.kernel_info()["models"] if m["model"] == model]
    return psutil.Process(pid).memory_info().rss


def test_a_prompt_too_long_for_the_context_is_e2big_before_it_is_tokenised(client, long_model):
    info = executor_of(client, long_model)
    t = time.monotonic()
    with pytest.raises(TooBig, match="at most 1200000"):  # 100,000 tokens of at most 12 characters
        client.spawn(prompt="x" * 4_000_000, model=long_model, max_new_tokens=1)
    with pytest.raises(TooBig, match="characters"):
        client.spawn(messages=[{"role": "user", "content": "y" * 700_000}] * 2, model=long_model, max_new_tokens=1)
    assert time.monotonic() - t < 2.0 and (info["context_len"], info["max_prompt_chars"]) == (100_000, 1_200_000)


def test_every_string_of_the_chat_messages_counts_against_the_character_bound(client, long_model):
    t = time.monotonic()
    with pytest.raises(TooBig, match=r"messages hold 3000013 characters \(roles, contents and every other field\)"):
        client.spawn(messages=[{"role": "u " * 1_500_000, "content": "hi"}], model=long_model, max_new_tokens=1)
    assert time.monotonic() - t < 2.0  # not tokenised: 4.5 s before


def test_a_prompt_that_cannot_fit_is_refused_after_a_prefix_and_the_worker_gives_its_memory_back(client, long_model):
    before = worker_rss(client, long_model)
    with pytest.raises(TooBig, match="prompt is 1895334 tokens"):
        client.spawn(prompt=FULLY_TOKENISED, model=long_model, max_new_tokens=1)
    after_whole = worker_rss(client, long_model)
    t = time.monotonic()
    with pytest.raises(TooBig, match="prompt cannot fit: its first 400000 of 1194000 characters are already 400000 "
                                     "tokens; the model's context holds 100000"):
        client.spawn(prompt="ab cd " * 199_000, model=long_model, max_new_tokens=1)  # just under the bound
    prefix_s = time.monotonic() - t
    after_prefix = worker_rss(client, long_model)
    # tokenising ~1.2M characters took hundreds of MB of the encoder threads' malloc arenas, and kept them
    assert (after_whole - before) / 2**20 < 64 and (after_prefix - before) / 2**20 < 64, (before, after_whole,
                                                                                          after_prefix)
    assert prefix_s < 3.0  # a third of the text tokenised, not all of it


def test_a_spawn_is_not_delayed_by_another_clients_long_tokenisation(kernel, client, long_model):
    big = {}

    def spawn_big():
        with kernel.client() as c:
            big["start"] = time.monotonic()
            try:
                c.spawn(prompt=FULLY_TOKENISED, model=long_model, max_new_tokens=1)  # admitted, tokenised...
            except TooBig as exc:  # ... then too many tokens for the context
                big["error"] = exc
            big["end"] = time.monotonic()

    thread = threading.Thread(target=spawn_big)
    thread.start()
    wait_for(lambda: "start" in big, what="the big spawn to be sent")
    t = time.monotonic()
    pid = client.spawn(prompt="hello", model=long_model, max_new_tokens=1)
    small_s = time.monotonic() - t
    thread.join(60)
    client.wait(pid)
    assert "error" in big and big["end"] - big["start"] > 1.0  # it really tokenised for a while
    assert small_s < 0.5 and t + small_s < big["end"], (small_s, big["end"] - big["start"])


@pytest.mark.parametrize("call", ["spawn", "model_load", "model_unload", "model_info"])
def test_a_model_path_the_os_refuses_is_einval_for_every_call_that_names_a_model(client, call):
    model = "/" + "a" * 300  # a component over 255 bytes
    args = {"prompt": "x", "model": model, "max_new_tokens": 1} if call == "spawn" else {"model": model}
    with pytest.raises(InvalidArgument, match="File name too long") as err:
        client.call(call, args)  # the raw call: what the kernel answers whatever the client does with paths
    assert len(err.value.message) < 250  # the path quoted short
    client.ping()


def test_a_model_shape_out_of_range_or_no_tokenizer_files_is_einval_before_a_worker_starts(client, tmp_path):
    import json

    from tests.tinymodel import make_tiny_gpt2

    path = make_tiny_gpt2(tmp_path / "g")
    good = json.loads((path / "config.json").read_text())
    for changes, fault in (({"n_embd": 10**12, "n_layer": 10**6}, "n_embd is 1000000000000"),  # the estimate overflowed
                           ({"n_positions": -5}, "n_positions is -5")):  # model-info said 2048; the load, EIO
        (path / "config.json").write_text(json.dumps({**good, **changes}))
        for call in (client.model_info, client.model_load):
            with pytest.raises(InvalidArgument, match=f"config.json: {fault}; it must be a whole number"):
                call(str(path))
    (path / "config.json").write_text(json.dumps(good))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # transformers would build a tokenizer of 1 token
        (path / name).unlink()
    with pytest.raises(InvalidArgument, match="no tokenizer files"):
        client.model_load(str(path))
    with pytest.raises(InvalidArgument, match="no tokenizer files"):
        client.spawn(prompt="x", model=str(path), max_new_tokens=1)
    assert str(path) not in [m["model"] for m in client.models()]


def test_a_broken_model_directory_is_einval_naming_the_file_and_the_fault(client, tmp_path):
    from tests.tinymodel import make_tiny_llama

    path = make_tiny_llama(tmp_path / "broken")
    (path / "config.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match=r"config\.json is not valid JSON"):
        client.spawn(prompt="x", model=str(path), max_new_tokens=1)
    (path / "config.json").write_text('{"model_type": "llama", "vocab_size": 261}')
    (path / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(InvalidArgument, match=r"'model\.safetensors' is not a safetensors file"):
        client.model_info(str(path))
    with pytest.raises(InvalidArgument, match=r"model\.safetensors"):
        client.model_load(str(path))
    client.ping()


def test_a_load_failure_the_worker_blames_on_the_files_reaches_the_caller_as_einval(tmp_path):
    async def main():
        ex, rec, ctx = await start_executor(tmp_path, "fail")
        try:
            return ex.ready.exception()
        finally:
            await stop_executor(ex, rec, ctx)

    err = asyncio.run(main())
    assert isinstance(err, InvalidArgument) and "no-such-architecture" in err.message


@pytest.mark.slow
def test_a_silent_worker_is_counted_dead_replaced_and_its_processes_resume(tiny_model):
    k = KernelProc(extra=["--worker-timeout", "2"])
    try:
        with k.client() as c:
            greedy = dict(model=tiny_model, max_new_tokens=300, temperature=0.0, ignore_eos=True)
            pid = c.spawn(prompt="x", **greedy)
            wait_for(lambda: c.stat(pid).output_tokens > 0, what="the process to generate")
            [worker] = k.worker_pids()
            os.kill(worker, signal.SIGSTOP)
            t = time.monotonic()
            try:
                wait_for(lambda: k.worker_pids() not in ([worker], [None]), timeout=20, what="a new worker")
                noticed = time.monotonic() - t
                r = c.wait(pid, timeout=30)
            finally:
                try:
                    os.kill(worker, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            assert 1.5 < noticed < 10
            assert r.finish_reason == "length" and r.token_ids == c.wait(c.spawn(prompt="x", **greedy)).token_ids
            c.ping()
    finally:
        k.stop()
