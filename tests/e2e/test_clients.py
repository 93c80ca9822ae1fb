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
