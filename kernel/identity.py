"""Who is calling, from the transport: the peer's uid over ipc, its CURVE key over tcp.

- ipc: the kernel reads SO_PEERCRED on every unix-socket connection; libzmq puts it in each message's
  ``Peer-Address`` property as ``localhost:UID:GID:PID`` (checked on this libzmq, 4.3). The user is the
  uid's account name (the uid in digits when it has none).
- tcp: CURVE (CurveZMQ, RFC 26) with a ZAP handler (pyzmq's ``zmq.auth`` authenticator on the kernel's
  loop). A key not in the keyring is refused at the handshake; an accepted connection's messages carry
  the key (``User-Id``), which the keyring maps to a user name on every message, so a key withdrawn
  with ``user_remove`` stops working at once, even on a connection already open.
- tcp with ``--insecure`` (loopback only): nothing is proven, every caller is ``anonymous``.

The keyring is a directory of public-key files (``keys/authorized``, syscalls/keys.py), one per key,
its user in the file's name; the admin manages it with ``llmos user add|ls|rm``.
"""

from __future__ import annotations

import os
import pwd
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85

from llmos.kernel.log import get_logger
from llmos.syscalls.errors import Exists, InvalidArgument, NotFound
from llmos.syscalls.keys import Z85_KEY, fingerprint, read_public_key, write_public_key

IPC, CURVE, INSECURE = "ipc", "curve", "insecure"
ANONYMOUS = "anonymous"
ZAP_DOMAIN = "llmos"  # the ZAP domain of the kernel's CURVE sockets
RELOAD_S = 1.0  # the keyring rereads its directory at most this often (an admin may edit it by hand)


@lru_cache(maxsize=4096)
def account_name(uid: int) -> str:
    """The account name of ``uid``; the uid in digits when the system has no name for it."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def owner_name() -> str:
    """The account that runs this process (from its uid, not from $USER)."""
    return account_name(os.geteuid())


def proof(frame: zmq.Frame, transport: str) -> str:
    """What a message's transport says of its sender: the Peer-Address over ipc (with the uid: ``uid_in``),
    the CURVE key the ZAP handler accepted (User-Id) over tcp, nothing on an --insecure listener."""
    if transport == INSECURE:
        return ""
    try:
        return frame.get("Peer-Address" if transport == IPC else "User-Id") or ""
    except zmq.ZMQError:
        return ""


def uid_in(peer_address: str) -> int | None:
    """The uid in an ipc message's Peer-Address (``localhost:UID:GID:PID``); None when it holds none."""
    parts = peer_address.rsplit(":", 3) if isinstance(peer_address, str) else []
    if len(parts) != 4 or not parts[1].isdigit():
        return None
    return int(parts[1])


@dataclass(frozen=True)
class KeyEntry:
    user: str
    key: str
    fingerprint: str
    added: float
    path: Path

    def to_wire(self) -> dict[str, Any]:
        return {"user": self.user, "key": self.key, "fingerprint": self.fingerprint, "added": self.added}


class Keyring:
    """The authorised CURVE keys: ``directory/USER.FINGERPRINT.key``, one public certificate per key."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._by_key: dict[str, KeyEntry] = {}
        self._stamp: tuple | None = None
        self._checked = 0.0

    def _reload(self, force: bool = False) -> None:
        """Reread the directory when a file in it changed (name, mtime or size: a file rewritten in place by
        hand counts), at most every RELOAD_S unless ``force``."""
        now = time.monotonic()
        if not force and now - self._checked < RELOAD_S:
            return
        self._checked = now
        files: dict[Path, tuple[int, int]] = {}
        try:
            for path in self.directory.glob("*.key"):
                try:
                    st = path.stat()
                except FileNotFoundError:  # removed between the listing and the stat
                    continue
                files[path] = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            pass
        stamp = tuple(sorted((p.name, *v) for p, v in files.items()))
        if stamp == self._stamp and not force:
            return
        by_key: dict[str, KeyEntry] = {}
        for path in sorted(files):
            user, _, _ = path.name[: -len(".key")].rpartition(".")
            try:
                key = read_public_key(path).decode("ascii")
            except Exception:  # a stray or broken file authorises nobody (said once per change of the file)
                if stamp != self._stamp:
                    get_logger("identity").warning("key_file_unreadable", path=str(path))
                continue
            if user:
                by_key[key] = KeyEntry(user, key, fingerprint(key.encode()), files[path][0] / 1e9, path)
        self._by_key, self._stamp = by_key, stamp

    def user_of(self, key: str) -> str | None:
        """The user ``key`` (Z85) stands for; None when it is not (or no longer) authorised."""
        self._reload()
        entry = self._by_key.get(key)
        return entry.user if entry is not None else None

    def entries(self) -> list[KeyEntry]:
        self._reload(force=True)
        return sorted(self._by_key.values(), key=lambda e: (e.user, e.added))

    def add(self, user: str, key: str) -> KeyEntry:
        """Authorise ``key`` for ``user``; EEXIST when the key already stands for someone."""
        if not Z85_KEY.match(key):  # the key itself, never a path (this runs on the kernel's machine)
            raise InvalidArgument("the key must be a CURVE public key in Z85 (40 characters)")
        raw, text = key.encode("ascii"), key
        self._reload(force=True)
        if text in self._by_key:
            raise Exists(f"key {fingerprint(raw)} already stands for user {self._by_key[text].user}")
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.directory / f"{user}.{fingerprint(raw)}.key"
        tmp = path.with_suffix(".tmp")
        write_public_key(tmp, raw, f"authorised for LLMOS user {user}")
        os.replace(tmp, path)
        self._reload(force=True)
        return self._by_key[text]

    def remove(self, user: str, key: str | None = None) -> int:
        """Withdraw ``user``'s keys (or the one given, by Z85 or fingerprint); ENOENT when none matches."""
        gone = [e for e in self.entries() if e.user == user and (key is None or key in (e.key, e.fingerprint))]
        if not gone:
            raise NotFound(f"user {user} has no authorised key" + (f" {key}" if key else ""))
        for e in gone:
            e.path.unlink(missing_ok=True)
        self._reload(force=True)
        return len(gone)


class KeyAuthenticator(AsyncioAuthenticator):
    """The ZAP handler: a CURVE client is let in when its key is in the keyring; its messages then carry
    the key (User-Id), which the bus maps to the user on each one."""

    def __init__(self, context: zmq.Context, keyring: Keyring, on_refused: Any = None) -> None:
        super().__init__(context)
        self.keyring = keyring
        self.on_refused = on_refused
        self.configure_curve_callback(ZAP_DOMAIN, self)

    def callback(self, domain: str, key: bytes) -> bool:  # zmq.auth's credentials provider protocol
        text = key.decode("ascii", "replace")
        if self.keyring.user_of(text) is not None:
            return True
        if self.on_refused is not None:
            self.on_refused(fingerprint(key))
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        return z85.encode(client_public_key).decode("ascii")
