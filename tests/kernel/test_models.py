"""The ModelManager's choices, driven directly: which model is evicted under a memory cap, and what EBUSY says.

Real ModelManager, real DeviceTable and real Executors that are never launched (no worker, no
bound socket): the policy is tested without processes.
"""

import asyncio
import time

import pytest
import zmq.asyncio

from llmos.drivers.devices import DeviceTable
from llmos.kernel import messages as m
from llmos.kernel.executor import Executor
from llmos.kernel.models import ModelEntry, ModelManager
from llmos.syscalls.errors import Busy, OutOfMemory

UNIT = 100 * 2**20


def model_dir(root, name):
    d = root / name
    d.mkdir()
    (d / "config.json").write_text("{}")  # resolve_model needs a Hugging Face directory with a tokenizer's
    (d / "tokenizer.json").write_text("{}")  # files, nothing more here
    return str(d.resolve())


def add_loaded(mm, ctx, root, path, *, keep_alive=300.0, options=None):
    """Register ``path`` as loaded with one ready instance holding UNIT bytes of the cpu."""
    entry = ModelEntry(path, "cpu", dict(options or {}), {"total_bytes": UNIT}, keep_alive)
    ex = Executor(ctx, root, path, None, None, root, dict(options or {}), "cpu")
    ex.holder = f"{path}#0"
    ex.ready.set_result(ex)
    mm.devices.cpu.allocate(ex.holder, UNIT)
    entry.executors.append(ex)
    mm.models[path] = entry
    return entry


def run(scenario):
    async def main():
        ctx = zmq.asyncio.Context()
        try:
            return await scenario(ctx)
        finally:
            await asyncio.sleep(0)  # let evicted executors' stop tasks run
            ctx.destroy(linger=0)
    return asyncio.run(main())


def test_the_least_recently_used_of_three_idle_models_is_evicted_first(tmp_path):
    async def scenario(ctx):
        mm = ModelManager(ctx, tmp_path, tmp_path, None, DeviceTable(3 * UNIT, gpus=[]))
        a, b, c = (model_dir(tmp_path, n) for n in "abc")
        for path in (a, b, c):  # loaded in this order: a is the oldest
            add_loaded(mm, ctx, tmp_path, path)
            time.sleep(0.002)
        # a spawn on a uses it: now b is the least recently used, then c, then a
        _, _, token = await mm.receive(m.Acquire(a, None))
        await mm.receive(m.Release(token))
        mm._place(UNIT, "auto").allocate("d#0", UNIT)  # a fourth model takes the room
        assert set(mm.models) == {a, c}
        mm._place(UNIT, "auto")
        assert set(mm.models) == {a}
        assert mm.devices.cpu.res.held == {f"{a}#0": UNIT, "d#0": UNIT}
    run(scenario)


def test_pinned_and_busy_models_are_never_chosen_and_enomem_names_what_is_loaded(tmp_path):
    async def scenario(ctx):
        mm = ModelManager(ctx, tmp_path, tmp_path, None, DeviceTable(3 * UNIT, gpus=[]))
        a, b, c = (model_dir(tmp_path, n) for n in "abc")
        add_loaded(mm, ctx, tmp_path, a, keep_alive=-1)  # the oldest, but pinned
        time.sleep(0.002)
        busy = add_loaded(mm, ctx, tmp_path, b)
        busy.pending = 1  # a spawn holds it
        time.sleep(0.002)
        add_loaded(mm, ctx, tmp_path, c)  # the newest, and the only one that may go
        mm._place(UNIT, "auto")
        assert set(mm.models) == {a, b}
        mm.devices.cpu.allocate("someone", UNIT)
        with pytest.raises(OutOfMemory, match="no idle model can be unloaded") as exc:
            mm._place(UNIT, "auto")
        assert a in exc.value.message and b in exc.value.message
    run(scenario)


def test_loading_a_loaded_model_with_other_options_names_them_and_what_to_run(tmp_path):
    async def scenario(ctx):
        mm = ModelManager(ctx, tmp_path, tmp_path, None, DeviceTable(3 * UNIT, gpus=[]))
        a = model_dir(tmp_path, "a")
        add_loaded(mm, ctx, tmp_path, a, options={"kv_policy": "static", "num_blocks": 65, "max_batch": 16})
        entry = mm.models[a]
        with pytest.raises(Busy) as exc:
            mm._check_same(entry, {"kv_policy": "dynamic", "num_blocks": 129, "max_batch": 16, "device": "auto"})
        msg = exc.value.message
        assert "kv_policy (asked dynamic, loaded static)" in msg and "kv_blocks (asked 128, loaded 64)" in msg
        assert "max_batch" not in msg and "device" not in msg  # the same, or left to the kernel
        assert f"llmos unload {a}" in msg and "load it again" in msg
        mm._check_same(entry, {"kv_policy": "static", "num_blocks": None, "instances": 1})  # same: no error
    run(scenario)
