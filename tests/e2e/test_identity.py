"""Real OS users sharing one kernel over a group's ipc socket: each is who its uid says, none may touch
another's processes or stop the kernel, the admin may. The kernel runs as root (the admin); users
llmos-t-a and llmos-t-b are members of group llmos-t-share, llmos-t-c is not (tests/osusers.py makes
them and runs code as them)."""

from __future__ import annotations

import contextlib
import grp
import io
import os
import json
import stat
from pathlib import Path
from typing import Iterator

import msgpack
import pytest
import zmq

from llmos.cli import main as cli_main  # imported here: the forked children must not import (osusers.as_user)
from llmos.client import Client
from llmos.syscalls.errors import LLMOSError, NotPermitted
from tests.conftest import KernelProc, wait_for
from tests.osusers import Raised, as_user, can_make_users, make_group, make_user, remove_group, remove_user

GROUP, A, B, C = "llmos-t-share", "llmos-t-a", "llmos-t-b", "llmos-t-c"
B_PROCS = 2  # user B's quota of live processes (--user-quota): quotas follow the proven user


@pytest.fixture(scope="module")
def users():
    why = can_make_users()
    if why:
        pytest.skip(why)
    make_group(GROUP)
    made = {A: make_user(A, (GROUP,)), B: make_user(B, (GROUP,)), C: make_user(C)}
    yield made
    for name in made:
        remove_user(name)
    remove_group(GROUP)


@pytest.fixture(scope="module")
def shared(users, tiny_model):
    k = KernelProc(extra=["--group", GROUP, "--user-quota", f"{B}:procs={B_PROCS}"])
    with k.client() as root:
        root.model_load(tiny_model, keep_alive=-1)
    yield k
    k.stop()


@contextlib.contextmanager
def raw_socket(address: str) -> Iterator[zmq.Socket]:
    """A plain ZeroMQ DEALER on ``address``: what a client in any language is."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    try:
        yield s
    finally:
        s.close()
        ctx.term()


def session_of(address: str, model: str) -> int:
    """A session that waits for its first write (BLOCKED): a process that stays put while others try it."""
    with Client(address) as c:
        return c.spawn(model=model, session=True)


def test_each_user_is_who_its_uid_says_and_only_root_is_the_admin(shared, users):
    for name in (A, B):
        hello = as_user(users[name], lambda: Client(shared.address).kernel)
        assert (hello["user"], hello["admin"], hello["transport"]) == (name, False, "ipc")
    with shared.client() as root:
        assert (root.kernel["user"], root.kernel["admin"], root.user) == ("root", True, "root")


def test_a_user_cannot_claim_another_name_in_hello(shared, users):
    """Regression (the identity spoof): hello {"user": "root"} from user A is EPERM."""
    with pytest.raises(Raised) as exc:
        as_user(users[A], lambda: Client(shared.address, user="root"))
    assert exc.value.errno == "EPERM" and A in exc.value.message
    assert as_user(users[A], lambda: Client(shared.address, user=A).user) == A  # naming oneself is fine


def test_another_user_cannot_wait_stream_stat_kill_renice_write_or_close_a_users_process(shared, users, tiny_model):
    pid = as_user(users[A], lambda: session_of(shared.address, tiny_model))

    def try_everything() -> dict[str, str]:
        out = {}
        with Client(shared.address) as c:
            for name, act in (("wait", lambda: c.wait(pid, timeout=5)), ("stream", lambda: list(c.stream(pid))),
                              ("stat", lambda: c.stat(pid)), ("kill", lambda: c.kill(pid, "KILL")),
                              ("stop", lambda: c.stop(pid)), ("nice", lambda: c.nice(pid, 5)),
                              ("write", lambda: c.write(pid, "hello")), ("close", lambda: c.close(pid))):
                try:
                    act()
                    out[name] = "done"
                except Exception as exc:  # noqa: BLE001 - what each call answered is the point
                    out[name] = getattr(getattr(exc, "errno", None), "name", type(exc).__name__)
        return out

    assert as_user(users[B], try_everything) == dict.fromkeys(
        ("wait", "stream", "stat", "kill", "stop", "nice", "write", "close"), "EPERM")
    with shared.client() as root:  # nothing of B's reached it; the admin may do all of it
        info = root.stat(pid)
        assert (info.owner, info.state, info.priority) == (A, "BLOCKED", 0)
        assert root.nice(pid, 4)["priority"] == 4
        assert root.close(pid).finish_reason in ("closed", "killed")

        def audited() -> list[dict] | None:  # log lines reach the ring from the logging thread: soon, not at once
            lines = [json.loads(ln) for ln in root.dmesg(n=500)]
            refused = {ln["call"] for ln in lines if ln.get("event") == "refused" and ln.get("user") == B}
            return lines if refused >= {"wait", "stream", "stat", "kill", "nice", "write", "close"} else None

        lines = wait_for(audited, what="user B's refusals in dmesg")
    admin = [ln for ln in lines if ln.get("event") == "admin_action" and ln.get("user") == "root"]
    assert any(ln["call"] == "nice" and f"of {A}" in ln["why"] for ln in admin)


def test_ps_lists_everyones_processes_but_not_their_text(shared, users, tiny_model):
    pid = as_user(users[A], lambda: session_of(shared.address, tiny_model))
    try:
        rows = as_user(users[B], lambda: [r.__dict__ for r in Client(shared.address).ps()])
        mine = [r for r in rows if r["pid"] == pid]
        assert mine and mine[0]["owner"] == A and mine[0]["text"] is None
    finally:
        with shared.client() as root:
            root.close(pid)


def test_a_user_cannot_shut_the_kernel_down_even_with_no_hello_but_the_admin_can(shared, users):
    """Regression (the anonymous shutdown): a raw socket's first frame, shutdown, is refused."""

    def raw_shutdown() -> dict:
        with raw_socket(shared.address) as s:
            s.send(msgpack.packb({"v": 1, "id": 1, "call": "shutdown", "args": {}}))
            assert s.poll(10_000), "no reply"
            return msgpack.unpackb(s.recv())

    reply = as_user(users[B], raw_shutdown)
    assert (reply["t"], reply["error"]) == ("err", "EPERM")
    assert as_user(users[B], lambda: Client(shared.address).ping()["pid"]) == shared.proc.pid  # still serving


def test_pipelined_hello_and_spawn_belong_to_the_connections_user(shared, users, tiny_model):
    """Regression: hello and spawn sent back to back (no wait for hello's reply) gave a process owned by
    "anonymous"; the user comes from the transport, so the very first frame is the user's."""

    def pipelined() -> int:
        with raw_socket(shared.address) as s:
            s.send(msgpack.packb({"v": 1, "id": 1, "call": "hello", "args": {"version": 1}}))
            s.send(msgpack.packb({"v": 1, "id": 2, "call": "spawn", "args": {"prompt": "p", "model": tiny_model,
                                                                           "max_new_tokens": 2}}))
            replies = {}
            while len(replies) < 2:
                assert s.poll(60_000), "no reply"
                r = msgpack.unpackb(s.recv())
                replies[r["id"]] = r
            return replies[2]["result"]["pid"]

    pid = as_user(users[A], pipelined)
    with shared.client() as root:
        assert root.wait(pid, reap=False).finish_reason in ("length", "stop")
        assert root.stat(pid).owner == A
        root.wait(pid)


def test_quotas_apply_to_the_proven_user(shared, users, tiny_model):
    def fill() -> tuple[list[int], str]:
        with Client(shared.address) as c:
            pids = [c.spawn(model=tiny_model, session=True) for _ in range(B_PROCS)]
            try:
                c.spawn(model=tiny_model, session=True)
                return pids, "spawned"
            except Exception as exc:  # noqa: BLE001
                return pids, exc.errno.name
    pids, third = as_user(users[B], fill)
    try:
        assert third == "EAGAIN"  # B's own limit
        other = as_user(users[A], lambda: session_of(shared.address, tiny_model))  # A is not limited by B's
        pids.append(other)
    finally:
        with shared.client() as root:
            for p in pids:
                root.close(p)


def test_the_socket_is_the_groups_and_the_rest_of_the_home_stays_the_owners(shared, users):
    home, sock = shared.home, shared.home / "run" / "kernel.sock"
    share_gid = grp.getgrnam(GROUP).gr_gid
    st = sock.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, share_gid)
    assert (stat.S_IMODE((home / "run").stat().st_mode), (home / "run").stat().st_gid) == (0o750, share_gid)
    assert stat.S_IMODE(home.stat().st_mode) == 0o710
    for private in ("store", "log", "keys"):
        assert stat.S_IMODE((home / private).stat().st_mode) == 0o700, private
    for f in (home / "run").iterdir():
        if f.name != "kernel.sock":  # the lock, the pid file, workers' sockets: owner-only
            assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f


def test_a_user_outside_the_group_cannot_reach_the_kernel(shared, users):
    with pytest.raises(Raised) as exc:
        as_user(users[C], lambda: Client(shared.address, connect_timeout=2))
    assert exc.value.errno == "EPERM" and "--group" in exc.value.message


def test_the_kernel_still_serves_everyone_after_all_the_refusals(shared, users, tiny_model):
    def generate() -> str:
        with Client(shared.address) as c:
            return c.wait(c.spawn("still there", model=tiny_model, max_new_tokens=3, temperature=0)).finish_reason

    assert as_user(users[B], generate) == "length"
    with shared.client() as root:
        assert root.kernel_info()["group"] == GROUP


def test_the_cli_run_by_each_user_says_who_it_is_and_refuses_another_users_kill(shared, users, tiny_model):
    pid = as_user(users[A], lambda: session_of(shared.address, tiny_model))

    def cli(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_main(["--address", shared.address, *argv])
        return code, out.getvalue(), err.getvalue()

    try:
        code, out, _ = as_user(users[A], lambda: cli("whoami"))
        assert code == 0 and out.startswith(f"{A} via ipc")
        code, _, err = as_user(users[B], lambda: cli("kill", str(pid)))
        assert code == 1 and "[EPERM]" in err and err.count("\n") == 1 and "Traceback" not in err
        code, out, _ = as_user(users[A], lambda: cli("kill", str(pid)))
        assert code == 0, out
    finally:
        with shared.client() as root:
            root.close(pid)


@pytest.fixture
def open_copy(tiny_model):
    """A copy of the tiny model in a directory every user may read (0755 dirs, 0644 files), not loaded yet."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="llmos-t-model-", dir="/tmp"))
    os.chmod(root, 0o755)
    shutil.copytree(tiny_model, root / "m")
    for p in [root / "m", *(root / "m").rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    yield root / "m"
    shutil.rmtree(root, ignore_errors=True)


def spawn_on(address: str, model: str) -> str:
    """Spawn one short greedy process on ``model``; 'ok', or the errno name it was refused with."""
    try:
        with Client(address) as c:
            c.wait(c.spawn("x", model=model, max_new_tokens=1, temperature=0))
        return "ok"
    except LLMOSError as exc:
        return exc.errno.name


def test_a_user_may_not_have_the_kernel_read_a_file_the_user_could_not(shared, users, open_copy):
    """Regression (reported): a model directory is read with the kernel's rights, so a symlinked tokenizer or chat
    template gave any user the bytes of the kernel's secret key back (through its process's prompt_ids)."""
    secret = shared.home / "keys" / "kernel.key_secret"
    (open_copy / "chat_template.jinja").unlink(missing_ok=True)
    (open_copy / "chat_template.jinja").symlink_to(secret)
    assert as_user(users[B], lambda: spawn_on(shared.address, str(open_copy))) == "EPERM"
    (open_copy / "chat_template.jinja").unlink()
    (open_copy / "tokenizer_config.json").chmod(0o600)  # root's, and closed to others
    assert as_user(users[B], lambda: spawn_on(shared.address, str(open_copy))) == "EPERM"
    (open_copy / "tokenizer_config.json").chmod(0o644)
    assert as_user(users[B], lambda: spawn_on(shared.address, str(open_copy))) == "ok"  # all hers to read: fine
    inside = shared.home / "run"
    assert as_user(users[B], lambda: spawn_on(shared.address, str(inside))) == "EPERM"  # the kernel's home


def test_a_tcp_user_may_use_loaded_and_store_models_but_not_load_a_directory(kernel, open_copy, tiny_model):
    with kernel.client() as root:
        root.model_load(tiny_model, keep_alive=-1)
    with kernel.client_as("llmos-t-remote") as remote:
        for model in (None, tiny_model):  # the default model, one the admin loaded
            remote.wait(remote.spawn("x", model=model, max_new_tokens=1, temperature=0))
        with pytest.raises(NotPermitted, match="only by the admin"):
            remote.spawn("x", model=str(open_copy), max_new_tokens=1)


def test_kernel_start_with_a_group_says_which_directory_keeps_the_members_out(users):
    """The warning was only in the kernel's log: `kernel start` printed 'started' and the members then could
    not connect, with no hint why."""
    import shutil
    import tempfile

    from tests.e2e.test_cli_fs import llmos

    closed = Path(tempfile.mkdtemp(prefix="llmos-t-closed-", dir="/tmp"))  # 0700: the members cannot pass
    home = closed / "home"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}, "LLMOS_HOME": str(home)}
    try:
        r = llmos(env, "kernel", "start", "--group", GROUP)
        assert r.returncode == 0 and b"started" in r.stdout, r.stderr
        assert "warning: members of group llmos-t-share cannot reach" in r.stderr and str(closed) in r.stderr
        assert as_user(users[A], lambda: _reach(home)) == "EPERM"  # as the warning says
    finally:
        llmos(env, "kernel", "stop")
        shutil.rmtree(closed, ignore_errors=True)


def _reach(home: Path) -> str:
    try:
        Client(f"ipc://{home}/run/kernel.sock", connect_timeout=2).close()
        return "ok"
    except LLMOSError as exc:
        return exc.errno.name
