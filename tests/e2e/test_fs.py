"""The namespace through a real kernel over the bus: put, get, ranges, list, rm, stat, streamed big values,
permissions, uploads tied to their connection, and dmesg."""

from __future__ import annotations

import asyncio
import json
import os
import uuid

import pytest

from llmos import AsyncClient, InvalidArgument, NotFound, NotPermitted
from llmos.client import Client
from llmos.fs import FRAME


def user() -> str:
    return f"u{uuid.uuid4().hex[:10]}"  # a user of its own per test: the shared kernel's store outlives tests


@pytest.fixture
def alice(kernel):
    name = user()
    c = kernel.client_as(name)  # really another user than the admin: its own CURVE key over tcp
    yield c
    try:
        c.fs.rm(f"/home/{name}", recursive=True)
    except NotFound:
        pass
    c.close()


def home(c: Client) -> str:
    return f"/home/{c.user}"


def test_put_get_ranges_list_stat_and_rm_through_the_kernel(alice):
    h = home(alice)
    st = alice.fs.put(f"{h}/notes/a.txt", "héllo wörld")
    assert st.size == len("héllo wörld".encode()) and st.owner == alice.user and st.kind == "file"
    assert alice.fs.get(f"{h}/notes/a.txt").decode() == "héllo wörld"
    assert alice.fs.get(f"{h}/notes/a.txt", 7, 3) == "héllo wörld".encode()[7:10]
    alice.fs.put(f"{h}/notes/b.bin", b"\x00\xff" * 10)
    alice.fs.put(f"{h}/top", b"")
    assert [(e.name, e.kind) for e in alice.fs.ls(h)] == [("notes", "dir"), ("top", "file")]
    assert [e.name for e in alice.fs.ls(f"{h}/notes")] == ["a.txt", "b.bin"]
    assert alice.fs.stat(f"{h}/notes").kind == "dir" and alice.fs.stat(f"{h}/notes").size == 2
    assert alice.fs.get(f"{h}/top") == b"" and alice.fs.exists(f"{h}/top")
    assert alice.fs.rm(f"{h}/notes/a.txt") == 1 and not alice.fs.exists(f"{h}/notes/a.txt")
    assert alice.fs.rm(h, recursive=True) == 2 and not alice.fs.exists(h)


def test_a_20_mib_value_is_streamed_in_frames_and_read_back_byte_exact(alice):
    blob = os.urandom(20 * 2**20 + 12345)
    calls: list[tuple[int, int | None]] = []
    st = alice.fs.put(f"{home(alice)}/big.bin", blob, progress=lambda done, total: calls.append((done, total)))
    assert st.size == len(blob) and sum(st.extents) == len(blob) and max(st.extents) <= 2**20
    assert len(calls) == -(-len(blob) // FRAME) and calls[-1] == (len(blob), len(blob))  # one call per frame
    assert alice.fs.get(f"{home(alice)}/big.bin") == blob
    with alice.fs.open(f"{home(alice)}/big.bin") as reader:
        assert reader.read(10) == blob[:10] and b"".join(reader) == blob[10:]
    assert alice.fs.get(f"{home(alice)}/big.bin", 3 * 2**20 + 1, 5 * 2**20) == blob[3 * 2**20 + 1:8 * 2**20 + 1]


def test_a_user_writes_only_its_own_home_and_only_the_admin_writes_models(kernel, alice):
    bob = kernel.client_as(user())
    try:
        bob.fs.put(f"{home(bob)}/mine", b"bob's")
        with pytest.raises(NotPermitted) as err:
            alice.fs.put(f"{home(bob)}/x", b"1")
        assert f"in {bob.user}'s home: only {bob.user} and the admin write there" in err.value.message
        with pytest.raises(NotPermitted, match="in .*'s home: only .* and the admin read there"):
            alice.fs.get(f"{home(bob)}/mine")
        with pytest.raises(NotPermitted, match="only the admin writes /models"):
            alice.fs.put("/models/not-yours/config.json", b"{}")
        with kernel.client() as root:  # the kernel's owner is the admin
            root.fs.put(f"/models/fs-test-{alice.user}/config.json", b"{}")
            assert alice.fs.get(f"/models/fs-test-{alice.user}/config.json") == b"{}"  # everyone reads /models
            assert root.fs.get(f"{home(bob)}/mine") == b"bob's"
            root.fs.rm(f"/models/fs-test-{alice.user}", recursive=True)
    finally:
        bob.fs.rm(home(bob), recursive=True)
        bob.close()


def test_an_upload_is_continued_only_by_the_connection_that_began_it(kernel, alice):
    path = f"{home(alice)}/up.bin"
    upload = alice.fs_put(path, b"first,", last=False)["upload"]
    with kernel.client_as(alice.user) as same_user_other_connection:  # her key, a new connection
        with pytest.raises(NotPermitted, match="belongs to another connection"):
            same_user_other_connection.fs_put(path, b"stolen", upload=upload)
    assert not alice.fs.exists(path)  # nothing is visible before the commit
    st = alice.fs_put(path, b"second", upload=upload)
    assert st["size"] == 12 and alice.fs.get(path) == b"first,second"


def test_bad_paths_are_einval_missing_ones_enoent_and_the_kernel_keeps_serving(alice):
    for path, what in (("notes.txt", "relative"), ("/home/x/../y", "'..'"), ("/etc/passwd", "no such namespace"),
                       ("/home/" + "n" * 300, "over 255 bytes")):
        with pytest.raises(InvalidArgument, match=what):
            alice.fs.get(path)
    with pytest.raises(NotFound):
        alice.fs.get(f"{home(alice)}/nothing-here")
    with pytest.raises(NotFound):
        alice.fs.rm(f"{home(alice)}/nothing-here")
    with pytest.raises(InvalidArgument, match="must be bytes"):
        alice.call("fs_put", {"path": f"{home(alice)}/x", "data": "a string is not bytes"})
    assert alice.ping()["time"] > 0


def test_the_root_lists_the_namespaces_and_var_log_kernel_reads_as_text(alice):
    assert [e.path for e in alice.fs.ls("/")] == ["/data", "/home", "/models", "/proc", "/var"]
    assert [e.path for e in alice.fs.ls("/var/log")] == ["/var/log/kernel"]
    first = alice.fs.get("/var/log/kernel").decode().splitlines()[0]
    assert json.loads(first)["event"] == "kernel_started"
    with pytest.raises(NotPermitted, match="only the kernel writes /var/log"):
        alice.fs.put("/var/log/kernel", b"forged")


def test_dmesg_shows_a_spawns_log_line_and_follow_streams_new_ones(kernel, tiny_model, alice):
    async def follow() -> tuple[int, dict]:
        async with AsyncClient(kernel.address) as watcher:
            lines = watcher.dmesg(n=1, follow=True)
            await lines.__anext__()  # the newest line: the kernel has subscribed this call to new ones
            pid = alice.spawn(prompt="hi", model=tiny_model, max_new_tokens=2, temperature=0.0)
            async for line in lines:
                rec = json.loads(line)
                if rec.get("event") == "spawn" and rec.get("pid") == pid:
                    await lines.aclose()
                    return pid, rec
        raise AssertionError("the follow ended")

    pid, followed = asyncio.run(asyncio.wait_for(follow(), 60))  # a line that never comes fails, not hangs
    alice.wait(pid)
    assert followed["owner"] == alice.user and followed["component"] == "procman"
    tail = alice.dmesg(n=10_000)
    recent = [json.loads(x) for x in tail]
    assert any(r["event"] == "spawn" and r["pid"] == pid for r in recent)
    seqs = [r["seq"] for r in recent]
    assert seqs == sorted(seqs) and tail.seq == seqs[-1]
