"""``llmos whoami``, ``llmos keygen`` and ``llmos user add|ls|rm`` as users run them, against the shared kernel:
a key made with keygen, authorised by the admin, is a user over CURVE until it is withdrawn."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path

import pytest

from llmos.client import Client
from llmos.syscalls.errors import NotPermitted
from llmos.syscalls.keys import read_key_pair, read_public_key
from tests.conftest import wait_for
from tests.e2e.test_cli_fs import llmos


def no_kernel(home: Path) -> dict[str, str]:
    """The environment of a user with ``home`` and no kernel in sight (keygen needs none)."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}, "LLMOS_HOME": str(home)}


@pytest.fixture
def home():
    """A fresh, empty $LLMOS_HOME for a user who has no keys yet."""
    d = Path(tempfile.mkdtemp(prefix="llmos-cu-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def name(kernel):
    """A user name nobody else uses; whatever keys it got on the shared kernel are withdrawn after."""
    user = f"u{uuid.uuid4().hex[:10]}"
    yield user
    with kernel.client() as admin:
        if any(k["user"] == user for k in admin.user_list()):
            admin.user_remove(user)


def one_error_line(r) -> str:
    """The single line a refused command prints on stderr (asserted: exit 1, no traceback)."""
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_keygen_makes_a_private_key_pair_prints_the_public_file_and_keeps_it_on_a_second_run(home):
    env = no_kernel(home)
    public, secret = home / "keys" / "client.key", home / "keys" / "client.key_secret"
    r = llmos(env, "keygen")
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr
    key = read_public_key(public).decode()
    assert "new key pair" in out and str(public) in out and key in out
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and read_key_pair(secret)[0].decode() == key

    r = llmos(env, "keygen")
    assert r.returncode == 0 and "already there" in r.stdout.decode() and key in r.stdout.decode()
    assert read_public_key(public).decode() == key  # not replaced

    j = json.loads(llmos(env, "keygen", "--json").stdout)
    assert j == {"public_file": str(public), "secret_file": str(secret), "key": key, "created": False}
    j = json.loads(llmos(env, "keygen", "--force", "--json").stdout)
    assert j["created"] is True and j["key"] != key and read_public_key(public).decode() == j["key"]


def test_keygen_json_on_a_first_run_says_created(home):
    j = json.loads(llmos(no_kernel(home), "keygen", "--json").stdout)
    assert j["created"] is True and Path(j["secret_file"]).is_file() and j["public_file"].endswith("client.key")


def test_a_key_the_admin_adds_is_its_user_over_curve_until_it_is_removed(kernel, home, name):
    assert llmos({**kernel.env, "LLMOS_HOME": str(home)}, "keygen").returncode == 0
    public, secret = home / "keys" / "client.key", home / "keys" / "client.key_secret"
    key = read_public_key(public).decode()

    r = llmos(kernel.env, "user", "add", name, "--key", str(public))  # the admin: the kernel's owner, over ipc
    assert r.returncode == 0, r.stderr
    assert f"user {name}: key" in r.stdout.decode() and "authorised" in r.stdout.decode()

    rows = json.loads(llmos(kernel.env, "user", "ls", "--json").stdout)
    mine = [k for k in rows if k["user"] == name]
    assert len(mine) == 1 and mine[0]["key"] == key and len(mine[0]["fingerprint"]) == 16
    table = llmos(kernel.env, "user", "ls").stdout.decode().splitlines()
    assert table[0].split() == ["USER", "FINGERPRINT", "ADDED", "KEY"]
    assert any(line.split()[0] == name and line.split()[1] == mine[0]["fingerprint"] and line.endswith(key)
               for line in table[1:])

    # the user, elsewhere: only the kernel's address and public key, and its own secret key
    as_user = ["--address", kernel.tcp, "--server-key", str(kernel.home / "keys" / "kernel.key"),
               "--client-key", str(secret)]
    r = llmos(kernel.env, "whoami", *as_user)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == f"{name} via curve at {kernel.tcp}"
    assert json.loads(llmos(kernel.env, "whoami", "--json", *as_user).stdout) == {
        "user": name, "admin": False, "transport": "curve", "address": kernel.tcp}

    with Client(kernel.tcp, server_key=str(kernel.home / "keys" / "kernel.key"), client_key=str(secret)) as open_:
        assert open_.kernel["user"] == name
        r = llmos(kernel.env, "user", "rm", name)
        assert r.returncode == 0 and r.stdout.decode().strip() == f"user {name}: 1 key withdrawn"
        with pytest.raises(NotPermitted):  # the connection already open loses the key at its next call
            open_.ps()
    assert name not in [k["user"] for k in json.loads(llmos(kernel.env, "user", "ls", "--json").stdout)]
    line = one_error_line(llmos(kernel.env, "whoami", *as_user))  # a new connection: refused at the handshake
    assert "[EPERM]" in line


def test_a_user_who_is_not_the_admin_gets_one_eperm_line_and_the_refusal_is_audited(kernel, home, name):
    env = kernel.env_as(name)
    assert llmos({**kernel.env, "LLMOS_HOME": str(home)}, "keygen").returncode == 0
    public = home / "keys" / "client.key"
    for argv in (("user", "add", "intruder", "--key", str(public)), ("user", "ls"), ("user", "rm", "root")):
        line = one_error_line(llmos(env, *argv))
        assert line.startswith("llmos: [EPERM]"), line
    with kernel.client() as admin:
        assert read_public_key(public).decode() not in [k["key"] for k in admin.user_list()]

        def refused_lines():
            return [d for d in map(json.loads, admin.dmesg(n=500))
                    if d.get("event") == "refused" and d.get("user") == name]
        lines = wait_for(lambda: len(refused_lines()) >= 3 and refused_lines(), timeout=10, what="three audit lines")
    assert [d["call"] for d in lines] == ["user_add", "user_list", "user_remove"]


def test_a_key_file_that_is_not_a_key_is_one_einval_line(kernel, home, name):
    for content in (b"not a certificate\n", b"public-key\n"):
        bad = home / "bad.key"
        bad.write_bytes(content)
        line = one_error_line(llmos(kernel.env, "user", "add", name, "--key", str(bad)))
        assert line.startswith("llmos: [EINVAL]") and "bad.key" in line, line
    line = one_error_line(llmos(kernel.env, "user", "add", name, "--key", str(home / "missing.key")))
    assert line.startswith("llmos: [ENOENT]"), line


def test_a_damaged_secret_key_file_is_one_einval_line_naming_it(kernel, home):
    assert llmos(no_kernel(home), "keygen").returncode == 0
    secret = home / "keys" / "client.key_secret"
    text = secret.read_text()
    key = text.split("secret-key")[1].split('"')[1]
    secret.write_text(text.replace(key, key[:20]))  # cut in half: ZeroMQ itself would refuse it
    line = one_error_line(llmos(kernel.env, "whoami", "--address", kernel.tcp, "--server-key",
                                str(kernel.home / "keys" / "kernel.key"), "--client-key", str(secret)))
    assert line.startswith("llmos: [EINVAL]") and "client.key_secret" in line, line


def test_whoami_over_ipc_is_the_processs_account_and_the_owner_is_the_admin(kernel):
    import pwd

    me = pwd.getpwuid(os.getuid()).pw_name
    r = llmos(kernel.env, "whoami")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == f"{me} (admin) via ipc at {kernel.address}"
    assert json.loads(llmos(kernel.env, "whoami", "--json").stdout) == {
        "user": me, "admin": True, "transport": "ipc", "address": kernel.address}


def test_kernel_stop_by_a_user_who_is_not_the_admin_is_one_eperm_line_and_the_kernel_runs_on(kernel, name):
    """Regression: the refused shutdown was swallowed, then the CLI waited 30 s for the kernel to exit (and
    would have killed it, or on a tcp kernel whatever local process had its pid)."""
    import time

    started = time.monotonic()
    r = llmos(kernel.env_as(name), "kernel", "stop")
    assert r.returncode == 1 and "[EPERM]" in r.stderr and "shutdown is the admin's" in r.stderr, r.stderr
    assert time.monotonic() - started < 15 and "Traceback" not in r.stderr
    with kernel.client() as c:
        assert c.ping()["pid"] == kernel.proc.pid and kernel.proc.poll() is None


def test_keygen_makes_a_missing_home_owner_only(tmp_path):
    home = tmp_path / "fresh-home"
    r = llmos(no_kernel(home), "keygen")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(home.stat().st_mode) == 0o700 and stat.S_IMODE((home / "keys").stat().st_mode) == 0o700


def test_a_kernel_started_on_a_tcp_address_serves_its_owner_over_curve_with_no_setup(home):
    """Regression: `llmos --address tcp://... kernel start` in a home with no keys yet probed for a running kernel
    with keys that did not exist, and exited 1 without starting one."""
    from tests.conftest import free_port

    env, address = no_kernel(home), f"tcp://127.0.0.1:{free_port()}"
    started = llmos(env, "--address", address, "kernel", "start")
    try:
        assert started.returncode == 0 and b"started" in started.stdout, started.stderr
        assert stat.S_IMODE((home / "keys" / "kernel.key_secret").stat().st_mode) == 0o600
        who = llmos(env, "--address", address, "whoami", "--json")
        assert who.returncode == 0, who.stderr
        assert json.loads(who.stdout) | {"address": None} == {"user": "root", "admin": True, "transport": "curve",
                                                               "address": None}
    finally:
        stopped = llmos(env, "--address", address, "kernel", "stop")
    assert stopped.returncode == 0 and b"stopped" in stopped.stdout, stopped.stderr
