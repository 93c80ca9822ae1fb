"""fs_rename through a real kernel: `llmos fs mv` as a user runs it, the rules it checks (remove the source,
write the destination, /data sticky), EEXIST without --replace, and the kernel serving on after refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from llmos.syscalls.errors import Exists, InvalidArgument, NotFound, NotPermitted

BIN = [sys.executable, "-m", "llmos"]


def llmos(kernel, *args, env=None):
    return subprocess.run([*BIN, *args], env=env or kernel.env, capture_output=True, text=True, timeout=120)


def test_fs_mv_moves_a_tree_and_replaces_only_when_told(kernel, client):
    base = f"/data/mv{uuid.uuid4().hex[:10]}"
    try:
        client.fs.put(f"{base}/src/a", b"A")
        client.fs.put(f"{base}/src/sub/b", b"B")
        client.fs.put(f"{base}/dst/old", b"old")
        r = llmos(kernel, "fs", "mv", f"{base}/src", f"{base}/dst")
        assert r.returncode == 1 and "[EEXIST]" in r.stderr and "Traceback" not in r.stderr
        assert client.fs.get(f"{base}/dst/old") == b"old"
        r = llmos(kernel, "fs", "mv", f"{base}/src", f"{base}/dst", "--replace", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["moved"] == 2, r.stderr
        assert [e.name for e in client.fs.ls(base)] == ["dst"]
        assert client.fs.get(f"{base}/dst/sub/b") == b"B" and not client.fs.exists(f"{base}/dst/old")
        r = llmos(kernel, "fs", "mv", f"{base}/dst/a", f"{base}/moved")
        assert r.returncode == 0 and r.stdout.strip() == f"moved {base}/dst/a to {base}/moved (1 file)", r.stderr
        with pytest.raises(NotFound):
            client.fs.rename(f"{base}/nothing", f"{base}/x")
        with pytest.raises(InvalidArgument):
            client.fs.rename(f"{base}/dst", f"{base}/dst/inside")
    finally:
        client.fs.rm(base, recursive=True)


def test_fs_rename_checks_who_may_remove_the_source_and_write_the_destination(kernel, client):
    base = f"/data/mv{uuid.uuid4().hex[:10]}"
    alice_name, bob_name = f"u{uuid.uuid4().hex[:10]}", f"u{uuid.uuid4().hex[:10]}"
    # two users other than the admin, each with its own CURVE key over tcp
    with kernel.client_as(alice_name) as alice, kernel.client_as(bob_name) as bob:
        try:
            alice.fs.put(f"{base}/alice/x", b"alice's")
            bob.fs.put(f"{base}/bob/y", b"bob's")
            with pytest.raises(NotPermitted, match=f"belongs to {alice_name}"):
                bob.fs.rename(f"{base}/alice", f"{base}/taken")
            with pytest.raises(NotPermitted, match=f"belongs to {alice_name}"):
                bob.fs.rename(f"{base}/bob", f"{base}/alice", replace=True)
            with pytest.raises(NotPermitted, match="only the admin writes /models"):
                bob.fs.rename(f"{base}/bob", "/models/stolen")
            with pytest.raises(NotPermitted, match=f"{alice_name}'s home"):
                bob.fs.rename(f"{base}/bob", f"/home/{alice_name}/y")
            with pytest.raises(Exists):
                bob.fs.rename(f"{base}/bob", f"{base}/alice")
            assert alice.fs.get(f"{base}/alice/x") == b"alice's" and bob.fs.get(f"{base}/bob/y") == b"bob's"
            assert bob.fs.rename(f"{base}/bob", f"/home/{bob_name}/y") == 1  # its own file, to its own home
            assert bob.fs.get(f"/home/{bob_name}/y/y") == b"bob's"
        finally:
            client.fs.rm(base, recursive=True)
            for c in (alice, bob):
                if client.fs.exists(f"/home/{c.user}"):
                    client.fs.rm(f"/home/{c.user}", recursive=True)
