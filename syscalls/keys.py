"""CURVE keys: where the kernel's and a client's key pairs live, and how a public key is read.

Over tcp the bus is encrypted and authenticated with ZeroMQ's CURVE mechanism (RFC 26/CurveZMQ:
Curve25519 keys, each side proves it holds its secret key). Keys are ZeroMQ certificate files, as
``zmq.auth.create_certificates`` writes them (a public ``NAME.key`` and a 0600 ``NAME.key_secret``),
under ``$LLMOS_HOME/keys``::

    keys/kernel.key, kernel.key_secret   the kernel's key pair, made on its first start
    keys/client.key, client.key_secret   this user's client key pair (``llmos keygen``; the kernel makes
                                         its owner's on its first start and authorises it)
    keys/authorized/NAME.FP.key          a client public key the admin authorised for user NAME
                                         (``llmos user add NAME --key FILE``; FP: the key's fingerprint)

A client finds the kernel's public key in ``server_key``, else ``$LLMOS_SERVER_KEY``, else its own
home's ``keys/kernel.key`` (the kernel's owner, on the kernel's machine); its own key pair in
``client_key``, else ``$LLMOS_CLIENT_KEY``, else its home's ``keys/client.key_secret``.
Used by the kernel and by clients alike; it imports nothing from either.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import zmq
import zmq.auth

from llmos.syscalls.address import llmos_home
from llmos.syscalls.errors import InvalidArgument, NotFound

Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")  # a 32-byte key in Z85: 40 characters


def keys_dir(home: Path | None = None) -> Path:
    return (home or llmos_home()) / "keys"


def authorized_dir(home: Path | None = None) -> Path:
    return keys_dir(home) / "authorized"


def fingerprint(public_key: bytes) -> str:
    """A short, stable name for a public key (Z85 bytes): the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def read_public_key(source: str | os.PathLike) -> bytes:
    """A public key (Z85, 40 bytes) from a certificate file (public or secret) or from the key's 40
    characters themselves. InvalidArgument when it is neither, NotFound when the file does not exist."""
    text = os.fspath(source).strip()
    if Z85_KEY.match(text) and not Path(text).exists():
        return text.encode("ascii")
    path = Path(text).expanduser()
    if not path.is_file():
        raise NotFound(f"no key file {text!r} (give a certificate file, as `llmos keygen` writes, or the "
                       f"40-character Z85 public key)")
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError, IndexError, zmq.ZMQError) as exc:  # IndexError: "public-key" with no "="
        raise InvalidArgument(f"{text!r} is not a ZeroMQ certificate file: {exc}") from None
    if not public or not Z85_KEY.match(public.decode("latin-1")):
        raise InvalidArgument(f"{text!r} holds no CURVE public key")
    return public


def read_key_pair(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a secret certificate file. NotFound / InvalidArgument as above."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise NotFound(f"no key file {str(p)!r}")
    try:
        public, secret = zmq.auth.load_certificate(p)
    except (OSError, ValueError, IndexError, zmq.ZMQError) as exc:  # IndexError: "public-key" with no "="
        raise InvalidArgument(f"{str(p)!r} is not a ZeroMQ certificate file: {exc}") from None
    if not secret or not all(Z85_KEY.match(k.decode("latin-1")) for k in (public, secret)):
        raise InvalidArgument(f"{str(p)!r} holds no secret key (give the .key_secret file)")
    return public, secret


def make_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """Create ``directory/NAME.key`` and the 0600 ``NAME.key_secret`` (the directory 0700) unless the
    secret file exists; return (public file, secret file).

    Atomic: the pair is made in a private directory beside them and the secret file appears whole, by a
    link that never replaces one (a reader racing the maker, as ``kernel start``'s launcher does the new
    kernel, never sees half a file; of two makers the first one's pair stands), then the public file is
    written from the secret file that stands, through a rename."""
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    old = os.umask(0o077)  # the directories made on the way ($LLMOS_HOME itself, maybe) are owner-only too
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not secret.exists():
            import shutil
            import tempfile

            staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=directory))
            try:
                _, made = zmq.auth.create_certificates(staging, name)
                os.chmod(made, 0o600)
                try:
                    os.link(made, secret)
                except FileExistsError:
                    pass  # another maker's pair stands
                staged_public = staging / "public"
                write_public_key(staged_public, read_key_pair(secret)[0], f"{name}: made by llmos")
                os.replace(staged_public, public)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    return public, secret


def write_public_key(path: Path, public_key: bytes, comment: str) -> None:
    """Write a public certificate file (ZeroMQ's format, readable by ``zmq.auth.load_certificate``)."""
    path.write_text(f"#   ZeroMQ CURVE Public Certificate\n#   {comment}\n\nmetadata\ncurve\n"
                    f"    public-key = \"{public_key.decode('ascii')}\"\n")


def server_key(given: str | os.PathLike | None = None, home: Path | None = None) -> bytes | None:
    """The kernel's public key for a client: ``given``, $LLMOS_SERVER_KEY, or the home's keys/kernel.key
    (None when none of them exists)."""
    source = given or os.environ.get("LLMOS_SERVER_KEY")
    if source:
        return read_public_key(source)
    default = keys_dir(home) / "kernel.key"
    return read_public_key(default) if default.is_file() else None


def client_key_pair(given: str | os.PathLike | None = None, home: Path | None = None) -> tuple[bytes, bytes] | None:
    """This client's (public, secret) keys: ``given``, $LLMOS_CLIENT_KEY, or the home's
    keys/client.key_secret (None when none of them exists)."""
    source = given or os.environ.get("LLMOS_CLIENT_KEY")
    if source:
        return read_key_pair(source)
    default = keys_dir(home) / "client.key_secret"
    return read_key_pair(default) if default.is_file() else None
