"""``llmos fs ...``, ``llmos dmesg`` and the shell's ls/cat/dmesg as a user runs them, against the shared kernel."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

from llmos.cli import main as cli_main


@pytest.fixture
def as_user(kernel):
    """(the user's name, its environment: the CLI is that user to the kernel, by its CURVE key); its home is
    removed after."""
    name = f"u{uuid.uuid4().hex[:10]}"
    env = kernel.env_as(name)
    yield name, env
    llmos(env, "fs", "rm", "-r", f"/home/{name}")


def llmos(env, *args, input: bytes = b""):
    """Run ``llmos ARGS`` in this process (as the command would, with ``env`` and ``input`` on stdin):
    (exit status, stdout bytes, stderr text). In-process: a subprocess per command would cost the suite
    half a second each."""
    out, err = io.BytesIO(), io.StringIO()
    stdout = io.TextIOWrapper(out, write_through=True)
    stdin = SimpleNamespace(buffer=io.BytesIO(input), isatty=lambda: False)
    with mock.patch.dict(os.environ, env, clear=True), mock.patch.object(sys, "stdin", stdin), \
            mock.patch.object(sys, "stdout", stdout), contextlib.redirect_stderr(err):
        try:
            code = cli_main(list(args))
        except SystemExit as exc:  # argparse refusing a flag
            code = exc.code
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_fs_put_ls_cat_stat_get_and_rm_from_the_command_line(as_user):
    name, env = as_user
    with tempfile.TemporaryDirectory(prefix="llmos-cli-fs-") as tmp:
        src = Path(tmp) / "src.bin"
        blob = os.urandom(6 * 2**20 + 7)  # two upload frames
        src.write_bytes(blob)
        r = llmos(env, "fs", "put", str(src), f"/home/{name}/data/blob.bin")
        assert r.returncode == 0 and f"/home/{name}/data/blob.bin ({len(blob)} bytes)" in r.stdout.decode()
        r = llmos(env, "fs", "put", "-", f"/home/{name}/hello.txt", input=b"hello from stdin\n")
        assert r.returncode == 0, r.stderr

        ls = llmos(env, "fs", "ls", f"/home/{name}").stdout.decode().splitlines()
        assert [line.split()[-1] for line in ls] == ["data/", "hello.txt"] and ls[1].split()[2] == name
        rows = json.loads(llmos(env, "fs", "ls", "--json", f"/home/{name}/data").stdout)
        assert rows[0]["path"] == f"/home/{name}/data/blob.bin" and rows[0]["size"] == len(blob)

        assert llmos(env, "fs", "cat", f"/home/{name}/hello.txt").stdout == b"hello from stdin\n"
        assert llmos(env, "fs", "cat", "--offset", "6", "--length", "4", f"/home/{name}/hello.txt").stdout == b"from"
        assert llmos(env, "fs", "cat", f"/home/{name}/data/blob.bin").stdout == blob

        st = json.loads(llmos(env, "fs", "stat", "--json", f"/home/{name}/data/blob.bin").stdout)
        assert st["size"] == len(blob) and st["owner"] == name and st["kind"] == "file"
        assert "   kind: dir" in llmos(env, "fs", "stat", f"/home/{name}/data").stdout.decode()

        out = Path(tmp) / "copy.bin"
        r = llmos(env, "fs", "get", f"/home/{name}/data/blob.bin", str(out))
        assert r.returncode == 0 and out.read_bytes() == blob and not Path(str(out) + ".part").exists()

        r = llmos(env, "fs", "rm", f"/home/{name}/data")
        assert r.returncode == 1 and "is a directory: remove it with -r" in r.stderr
        r = llmos(env, "fs", "rm", "-r", f"/home/{name}/data")
        assert r.returncode == 0 and "(1 files)" in r.stdout.decode()


def test_fs_refusals_are_one_line_with_the_errno_and_exit_1(as_user):
    name, env = as_user
    cases = [
        (("fs", "put", "-", "/models/mine/config.json"), "[EPERM] only the admin writes /models"),
        (("fs", "cat", "/home/someone-else/secret"), "[EPERM]"),
        (("fs", "cat", f"/home/{name}/missing"), "[ENOENT] no such file"),
        (("fs", "ls", "/etc"), "[EINVAL] no such namespace"),
        (("fs", "get", "relative/path", "-"), "[EINVAL]"),
    ]
    for argv, said in cases:
        r = llmos(env, *argv, input=b"{}")
        err = r.stderr
        assert r.returncode == 1 and said in err and "Traceback" not in err and len(err.splitlines()) == 1, (argv, err)


def test_dmesg_prints_the_kernels_log_for_people_and_as_json(kernel, as_user):
    _, env = as_user
    r = llmos(env, "dmesg", "-n", "5")
    lines = r.stdout.decode().splitlines()
    assert r.returncode == 0 and 1 <= len(lines) <= 5 and all(line.startswith("[") for line in lines)
    assert "kernel_started" in llmos(env, "dmesg", "-n", "10000").stdout.decode()
    raw = llmos(env, "dmesg", "--json", "-n", "3").stdout.decode().splitlines()
    seqs = [json.loads(x)["seq"] for x in raw]
    assert len(seqs) == len(raw) and seqs == sorted(seqs)
    r = llmos(env, "dmesg", "-n", "-1")
    assert r.returncode == 2 and "must be >= 0" in r.stderr


def test_the_shell_lists_cats_and_shows_dmesg(kernel, as_user):
    name, env = as_user
    assert llmos(env, "fs", "put", "-", f"/home/{name}/greeting", input="héllo\n".encode()).returncode == 0
    script = "\n".join(["ls", f"ls /home/{name}", f"cat /home/{name}/greeting", "cat /home/nobody/x",
                        "dmesg -n 3", "ls /nowhere", "exit"]) + "\n"
    r = subprocess.run([sys.executable, "-m", "llmos.shell"], env=env, input=script, capture_output=True, text=True,
                       timeout=120)
    out = r.stdout
    assert r.returncode == 0 and "Traceback" not in out + r.stderr, r.stderr
    assert "models/" in out and "home/" in out and "var/" in out
    assert "greeting" in out and "héllo" in out
    assert "error: [EPERM]" in out and "error: [EINVAL] no such namespace" in out
    assert sum(1 for line in out.splitlines() if line.startswith("[") and "] " in line) >= 1  # dmesg lines


def test_the_kernel_log_can_be_cat_and_get_though_it_is_made_anew_on_each_read(kernel, client, tmp_path):
    """/var/log/kernel is synthesised per request (its mtime is the time of the request): a reader that asked
    again past the end to find it compared two different (size, mtime) and said EIO "replaced"."""
    r = llmos(kernel.env, "fs", "cat", "/var/log/kernel")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.endswith(b"\n") and json.loads(r.stdout.splitlines()[0])  # JSON lines, oldest first
    r = llmos(kernel.env, "fs", "get", "/var/log/kernel", str(tmp_path / "log"))
    assert r.returncode == 0 and r.stderr == "" and (tmp_path / "log").read_bytes().endswith(b"\n"), r.stderr
    with client.fs.open("/var/log/kernel") as reader:
        assert reader.read().endswith(b"\n")


def test_ls_says_when_a_listing_is_cut_and_errors_name_the_cli_s_flags_not_the_syscall_s(kernel, as_user):
    name, env = as_user
    home = f"/home/{name}"
    for f in ("a", "b", "c"):
        assert llmos(env, "fs", "put", "-", f"{home}/d/{f}", input=b"x").returncode == 0
    r = llmos(env, "fs", "ls", "--limit", "2", f"{home}/d")
    assert r.returncode == 0 and r.stdout.count(b"\n") == 2 and "more than 2 entries: use --limit" in r.stderr
    r = llmos(env, "fs", "ls", f"{home}/d")
    assert r.stdout.count(b"\n") == 3 and r.stderr == ""
    r = llmos(env, "fs", "rm", f"{home}/d")
    assert r.returncode != 0 and "remove it with -r" in r.stderr and "recursive=True" not in r.stderr, r.stderr
    script = f"ls --limit 1 {home}/d\ncat {home}/d\nexit\n"
    r = subprocess.run([sys.executable, "-m", "llmos.shell"], env=env, input=script, capture_output=True, text=True,
                       timeout=120)
    assert "more than 1 entries: use --limit" in r.stdout and "list it with ls" in r.stdout, r.stdout + r.stderr
    assert "fs_list" not in r.stdout
