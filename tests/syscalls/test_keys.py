"""CURVE key files (syscalls/keys.py): reading a public key from any form a user may give, making a key
pair that stays private, and where a client finds the kernel's key and its own."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
import zmq.auth

from llmos.syscalls.errors import Errno, InvalidArgument, NotFound
from llmos.syscalls.keys import (client_key_pair, fingerprint, keys_dir, make_key_pair, read_key_pair,
                                 read_public_key, server_key, write_public_key)


@pytest.fixture
def tmp():
    d = Path(tempfile.mkdtemp(prefix="llmos-keys-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def pair(directory: Path, name: str) -> tuple[Path, Path, bytes, bytes]:
    """(public file, secret file, public key, secret key) of a new certificate pair, as zmq writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = map(Path, zmq.auth.create_certificates(directory, name))
    public, secret = zmq.auth.load_certificate(secret_file)
    return public_file, secret_file, public, secret


def test_a_public_key_is_read_from_a_public_file_a_secret_file_or_its_z85_text(tmp):
    public_file, secret_file, public, _ = pair(tmp, "alice")
    assert len(public) == 40
    assert read_public_key(public_file) == public
    assert read_public_key(str(secret_file)) == public  # the secret file holds the public key too
    assert read_public_key(public.decode()) == public
    assert read_public_key(f"  {public.decode()}\n") == public  # pasted with blanks around it
    write_public_key(tmp / "copy.key", public, "a copy")
    assert read_public_key(tmp / "copy.key") == public


def test_a_missing_key_file_is_enoent_naming_it(tmp):
    with pytest.raises(NotFound) as exc:
        read_public_key(tmp / "nope.key")
    assert exc.value.errno == Errno.ENOENT and "nope.key" in exc.value.message
    with pytest.raises(NotFound):
        read_key_pair(tmp / "nope.key_secret")


@pytest.mark.parametrize("content", [b"hello, this is not a certificate\n", os.urandom(300),
                                     b"metadata\ncurve\n    public-key = \"tooshort\"\n",
                                     b"public-key\n"])  # a line with no '=' at all
def test_a_file_that_is_not_a_certificate_is_einval(tmp, content):
    bad = tmp / "bad.key"
    bad.write_bytes(content)
    with pytest.raises(InvalidArgument) as exc:
        read_public_key(bad)
    assert exc.value.errno == Errno.EINVAL and "bad.key" in exc.value.message
    with pytest.raises(InvalidArgument):
        read_key_pair(bad)


def test_a_public_file_given_where_the_secret_is_needed_is_einval_saying_so(tmp):
    public_file, _, _, _ = pair(tmp, "alice")
    with pytest.raises(InvalidArgument, match="key_secret"):
        read_key_pair(public_file)


@pytest.mark.parametrize("which", ["public-key", "secret-key"])
@pytest.mark.parametrize("damage", [lambda k: k[:20], lambda k: k[:39] + ",", lambda k: k[:39] + "\u00e9"],
                         ids=["cut", "comma", "non-ascii"])
def test_a_key_pair_file_with_a_damaged_key_is_einval_not_a_key_zeromq_would_refuse(tmp, which, damage):
    _, secret_file, _, _ = pair(tmp, "alice")
    lines = secret_file.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(which):
            key = line.split('"')[1]
            lines[i] = line.replace(key, damage(key))
    secret_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidArgument, match="alice.key_secret"):
        read_key_pair(secret_file)
    if which == "public-key":
        with pytest.raises(InvalidArgument, match="alice.key_secret"):
            read_public_key(secret_file)


def test_make_key_pair_keeps_the_secret_file_0600_even_under_umask_022_and_never_replaces_it(tmp):
    old = os.umask(0o022)
    try:
        public_file, secret_file = make_key_pair(tmp / "keys", "client")
    finally:
        os.umask(old)
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp / "keys").stat().st_mode) == 0o700
    public, secret = read_key_pair(secret_file)
    assert read_public_key(public_file) == public and len(secret) == 40
    os.chmod(secret_file, 0o644)  # loosened by hand: the next call tightens it, and keeps the key
    assert make_key_pair(tmp / "keys", "client") == (public_file, secret_file)
    assert read_key_pair(secret_file) == (public, secret)
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600


def test_the_fingerprint_is_16_hex_digits_and_differs_between_keys(tmp):
    _, _, a, _ = pair(tmp, "a")
    _, _, b, _ = pair(tmp, "b")
    assert len(fingerprint(a)) == 16 and int(fingerprint(a), 16) >= 0
    assert fingerprint(a) == fingerprint(a) != fingerprint(b)


def test_the_kernels_key_is_the_argument_then_the_environment_then_the_home(tmp, monkeypatch):
    _, _, from_arg, _ = pair(tmp / "arg", "kernel")
    env_file, _, from_env, _ = pair(tmp / "env", "kernel")
    home = tmp / "home"
    _, _, from_home, _ = pair(keys_dir(home), "kernel")
    monkeypatch.delenv("LLMOS_SERVER_KEY", raising=False)
    monkeypatch.setenv("LLMOS_HOME", str(home))
    assert server_key() == from_home
    monkeypatch.setenv("LLMOS_SERVER_KEY", str(env_file))
    assert server_key() == from_env
    assert server_key(str(tmp / "arg" / "kernel.key")) == from_arg
    monkeypatch.setenv("LLMOS_SERVER_KEY", from_env.decode())  # the key's 40 characters will do
    assert server_key() == from_env
    monkeypatch.delenv("LLMOS_SERVER_KEY")
    monkeypatch.setenv("LLMOS_HOME", str(tmp / "empty"))
    assert server_key() is None


def test_the_clients_key_pair_is_the_argument_then_the_environment_then_the_home(tmp, monkeypatch):
    _, arg_secret, *from_arg = pair(tmp / "arg", "client")
    _, env_secret, *from_env = pair(tmp / "env", "client")
    home = tmp / "home"
    _, _, *from_home = pair(keys_dir(home), "client")
    monkeypatch.delenv("LLMOS_CLIENT_KEY", raising=False)
    monkeypatch.setenv("LLMOS_HOME", str(home))
    assert client_key_pair() == tuple(from_home)
    monkeypatch.setenv("LLMOS_CLIENT_KEY", str(env_secret))
    assert client_key_pair() == tuple(from_env)
    assert client_key_pair(arg_secret) == tuple(from_arg)
    monkeypatch.delenv("LLMOS_CLIENT_KEY")
    monkeypatch.setenv("LLMOS_HOME", str(tmp / "empty"))
    assert client_key_pair() is None
    assert client_key_pair(home=home) == tuple(from_home)  # an explicit home beats $LLMOS_HOME


def test_a_missing_key_named_by_the_environment_is_an_error_not_a_fallback_to_the_home(tmp, monkeypatch):
    home = tmp / "home"
    pair(keys_dir(home), "kernel")
    monkeypatch.setenv("LLMOS_HOME", str(home))
    monkeypatch.setenv("LLMOS_SERVER_KEY", str(tmp / "gone.key"))
    with pytest.raises(NotFound):
        server_key()


def _make(directory: str, start, out) -> None:
    from llmos.syscalls.keys import make_key_pair, read_key_pair

    start.wait()
    try:
        out.put(read_key_pair(make_key_pair(Path(directory), "client")[1])[0])
    except Exception as exc:  # a maker that read another's half-written file
        out.put(repr(exc))


def test_a_key_pair_appears_whole_and_racing_makers_agree_on_one_pair(tmp_path):
    """kernel start's launcher reads the client key while the new kernel makes it: a reader sees no file or
    the whole file, never half of one, and of makers racing the first one's pair stands for all."""
    import multiprocessing

    from llmos.syscalls.keys import read_key_pair, read_public_key

    ctx = multiprocessing.get_context("fork")
    for round_ in range(20):
        directory = tmp_path / f"k{round_}"
        secret = directory / "client.key_secret"
        start, out = ctx.Barrier(4), ctx.Queue()
        makers = [ctx.Process(target=_make, args=(str(directory), start, out)) for _ in range(3)]
        for m in makers:
            m.start()
        start.wait()
        while any(m.is_alive() for m in makers):
            if secret.exists():
                read_key_pair(secret)  # raises on half a file
        publics = [out.get(timeout=30) for _ in makers]
        assert len(set(publics)) == 1 and isinstance(publics[0], bytes), publics
        assert read_public_key(directory / "client.key") == publics[0]
        assert sorted(p.name for p in directory.iterdir()) == ["client.key", "client.key_secret"]
