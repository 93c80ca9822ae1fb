"""A delegate (a gateway's account) acts for users over a real kernel: the session kernel runs with
``--delegate llmos-gw=dl-alice,dl-bob`` (tests/conftest.py)."""

import pytest

from llmos.aclient import AsyncClient
from llmos.syscalls.errors import NotPermitted


def test_what_a_delegate_spawns_for_a_user_is_that_users_process(kernel, tiny_model):
    with kernel.client_as("llmos-gw", act_for="dl-alice") as gw, kernel.client_as("dl-alice") as alice, \
            kernel.client_as("dl-bob") as bob:
        assert (gw.user, gw.kernel["by"], gw.kernel["transport"]) == ("dl-alice", "llmos-gw", "delegated")
        pid = gw.spawn(prompt="Hi", model=tiny_model, max_new_tokens=2, temperature=0)
        assert {p.pid: p.owner for p in alice.ps()}[pid] == "dl-alice"
        with pytest.raises(NotPermitted, match="belongs to dl-alice"):
            bob.stat(pid)
        assert alice.wait(pid, timeout=60).finish_reason in ("length", "stop")  # hers: she may reap it


def test_a_delegate_cannot_act_for_users_it_was_not_named_for_nor_the_admin(kernel):
    for target in ("dl-carol", "root"):
        with pytest.raises(NotPermitted):
            kernel.client_as("llmos-gw", act_for=target)
    with pytest.raises(NotPermitted, match="--delegate dl-bob"):
        kernel.client_as("dl-bob", act_for="dl-alice")  # not a delegate
    with kernel.client() as admin:
        refused = [ln for ln in admin.dmesg(n=200) if '"refused"' in ln and "dl-carol" in ln]
    assert refused and '"llmos-gw"' in refused[-1]  # audited as the delegate's own act


def test_a_delegated_call_may_not_load_a_model_directory(kernel, tmp_path):
    with kernel.client_as("llmos-gw", act_for="dl-alice") as gw:
        with pytest.raises(NotPermitted, match="delegated callers only by the admin"):
            gw.spawn(prompt="x", model=str(tmp_path))


def test_the_admin_acts_for_any_user_and_the_async_client_too(kernel, tiny_model):
    import asyncio

    async def go():
        c = await AsyncClient(kernel.address, act_for="dl-zed").connect()
        try:
            pid = await c.spawn(prompt="Hi", model=tiny_model, max_new_tokens=1, temperature=0)
            procs = {p.pid: p.owner for p in await c.ps()}
            await c.wait(pid, timeout=60)
            return c.user, c.kernel["by"], procs[pid]
        finally:
            await c.close()

    user, by, owner = asyncio.run(go())
    assert (user, owner) == ("dl-zed", "dl-zed") and by not in (None, "dl-zed")
