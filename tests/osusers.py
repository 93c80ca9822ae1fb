"""Real OS users for permission tests: create them (useradd), and run code as one of them.

The test's own interpreter may live where other users cannot reach it (here /root/.pyenv, under a
0700 /root), so ``runuser -u U python ...`` cannot even start Python as U. ``as_user`` does what
runuser does after the exec instead: it forks, drops to the user's uid, gid and groups (setgroups,
setgid, setuid, as runuser and setpriv do), and runs the function in that real process of that real
user; whatever it returns (or the LLMOS error it raises) comes back through a pipe. Over ipc the
kernel then reads that uid with SO_PEERCRED, as it would for a user's own program.
"""

from __future__ import annotations

import grp
import os
import pickle
import pwd
import select
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class OSUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def can_make_users() -> str | None:
    """None when this test may create OS users; else why not (the skip reason)."""
    if os.geteuid() != 0:
        return "creating OS users needs root (useradd); run the suite as root to test real users"
    missing = [t for t in ("useradd", "userdel", "groupadd", "groupdel") if shutil.which(t) is None]
    if missing:
        return f"this machine lacks {', '.join(missing)}"
    return None


def make_group(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        subprocess.run(["groupadd", name], check=True, capture_output=True)
        return grp.getgrnam(name).gr_gid


def make_user(name: str, groups: tuple[str, ...] = ()) -> OSUser:
    """The user ``name`` (created, with no home and no login shell, when missing), in ``groups``."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        cmd = ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group"]
        subprocess.run([*cmd, *(["--groups", ",".join(groups)] if groups else []), name], check=True,
                       capture_output=True)
    pw = pwd.getpwnam(name)
    gids = tuple(sorted({pw.pw_gid, *(grp.getgrnam(g).gr_gid for g in groups)}))
    return OSUser(name, pw.pw_uid, pw.pw_gid, gids)


def remove_user(name: str) -> None:
    subprocess.run(["userdel", name], capture_output=True)


def remove_group(name: str) -> None:
    subprocess.run(["groupdel", name], capture_output=True)


class Raised(Exception):
    """What the function run as another user raised: its class name, errno name and message."""

    def __init__(self, kind: str, errno: str | None, message: str) -> None:
        super().__init__(f"{kind} [{errno}] {message}")
        self.kind, self.errno, self.message = kind, errno, message


def as_user(user: OSUser, fn: Callable[[], Any], timeout: float = 120.0) -> Any:
    """Run ``fn()`` in a child process that is ``user`` (uid, gid, groups); return its result, or raise
    Raised with what it raised. A child still running after ``timeout`` s is killed (AssertionError).

    Import what ``fn`` needs before calling this: the child is a fork of a threaded process (a module that
    another thread was importing at the fork stays locked in the child), and the user may not be able to
    read the interpreter's own files."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become the user, run, report, and leave without running the parent's cleanup
        code = 0
        try:
            os.close(read)
            os.setgroups(list(user.groups))
            os.setgid(user.gid)
            os.setuid(user.uid)
            assert os.getuid() == user.uid and os.geteuid() == user.uid
            home = pwd.getpwuid(user.uid).pw_dir  # the environment runuser gives: the user's HOME, USER, LOGNAME
            os.environ.update(HOME=home, USER=user.name, LOGNAME=user.name)
            os.environ.pop("LLMOS_HOME", None)
            try:
                out: Any = ("ok", fn())
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                errno = getattr(getattr(exc, "errno", None), "name", None)
                out = ("raised", type(exc).__name__, errno, getattr(exc, "message", None) or str(exc))
            with os.fdopen(write, "wb") as f:
                pickle.dump(out, f)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    data, deadline = b"", time.monotonic() + timeout
    with os.fdopen(read, "rb", buffering=0) as f:
        while True:
            ready, _, _ = select.select([f], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"the child running as {user.name} did not finish within {timeout} s")
            piece = f.read(65536)
            if not piece:
                break
            data += piece
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, f"the child running as {user.name} failed"
    out = pickle.loads(data)
    if out[0] == "ok":
        return out[1]
    raise Raised(*out[1:])
