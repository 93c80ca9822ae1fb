"""Several client programs at once, and the asyncio client."""

import asyncio
import json
import subprocess
import sys

from llmos import AsyncClient, NoSuchProcess

PROGRAM = """
import json, sys
from llmos import Client
c = Client()
pids = [c.spawn(prompt=f"client {sys.argv[1]} #{i}", model=sys.argv[2], max_new_tokens=12,
                temperature=0.0, ignore_eos=True) for i in range(3)]
print(json.dumps([c.wait(p).stats.output_tokens for p in pids]))
"""


def test_two_client_processes_are_served_at_once(kernel, tiny_model):
    procs = [subprocess.Popen([sys.executable, "-c", PROGRAM, str(i), tiny_model], env=kernel.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert json.loads(out) == [12, 12, 12]


def test_the_async_client_spawns_streams_waits_and_kills(kernel, tiny_model):
    async def main():
        async with AsyncClient(kernel.address) as c:
            assert c.kernel["version"] == 1
            pid = await c.spawn(prompt="async", model=tiny_model, max_new_tokens=6, temperature=0.0, ignore_eos=True)
            chunks = [t async for t in c.stream(pid)]
            res = await c.wait(pid)
            assert "".join(chunks) == res.text and res.stats.output_tokens == 6
            pids = await asyncio.gather(*(c.spawn(prompt=str(i), model=tiny_model, max_new_tokens=4)
                                          for i in range(3)))
            results = await asyncio.gather(*(c.wait(p) for p in pids))
            assert all(r.stats.output_tokens <= 4 for r in results)
            long = await c.spawn(prompt="x", model=tiny_model, max_new_tokens=5000, ignore_eos=True)
            assert await c.kill(long, "KILL") == "ZOMBIE"
            assert (await c.wait(long)).finish_reason == "killed"
            rows = await c.ps()
            assert long not in [r.pid for r in rows]
            try:
                await c.stat(long)
            except NoSuchProcess:
                pass
            else:
                raise AssertionError("reaped pid still present")
            assert (await c.kernel_info())["pid"] == kernel.proc.pid
            text = await c.generate_text("hi", model=tiny_model, max_new_tokens=3)
            assert isinstance(text, str)
    asyncio.run(main())


# A client dropped without close() right after an error reply: the exception's traceback holds the client in a
# reference cycle, so the collector finalises the client's objects in an arbitrary order. zmq's Context.__del__
# -> term() waits for every socket of that context to close; it must never hang the program.
DROPPED = """
import asyncio, gc, faulthandler, sys
faulthandler.dump_traceback_later(20, exit=True)  # a hang prints where it is stuck and fails the test
from llmos import AsyncClient, Client, LLMOSError

def sync_client():
    c = Client()
    try:
        c.stat(999999)
    except LLMOSError as e:
        print("got", e.errno.name, flush=True)

async def async_client():
    c = await AsyncClient().connect()
    try:
        await c.stat(999999)
    except LLMOSError as e:
        print("got", e.errno.name, flush=True)

for _ in range(3):
    sync_client() if sys.argv[1] == "sync" else asyncio.run(async_client())
    gc.collect()
print("no hang", flush=True)
"""


def test_a_client_dropped_after_an_error_never_hangs_at_collection(kernel):
    for kind in ("sync", "async"):
        p = subprocess.run([sys.executable, "-c", DROPPED, kind], env=kernel.env, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0 and p.stdout.splitlines() == ["got ESRCH"] * 3 + ["no hang"], \
            (kind, p.returncode, p.stdout, p.stderr[-3000:])
