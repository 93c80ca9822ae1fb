"""The gateway's API keys: HOME/gateway/api_keys.json maps the SHA-256 of each key to an LLMOS user.

The file holds digests only, never a key: a key is shown once, when ``llmos api-key add USER`` makes it.
It is 0600 in a 0700 directory, written whole to a temporary file and renamed (a reader never sees half);
``add`` and ``remove`` hold an exclusive flock on ``.api_keys.lock`` beside it for their read-modify-write,
so that two at once never lose a key. The gateway re-reads it when its mtime or size changes, so added
and removed keys take effect at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from llmos.syscalls.errors import InvalidArgument, NotFound
from llmos.syscalls.table import USER_NAME, USER_PATTERN

KEY_PREFIX = "llmos-"  # so that a leaked key is recognisable (secret scanners, logs)
ID_CHARS = 12  # hex digits of the digest that name a key in `api-key ls` and `api-key rm --id`
log = logging.getLogger("llmos.gateway")


@dataclass(frozen=True)
class ApiKey:
    """One authorised key: its user, its id (the digest's first ID_CHARS hex digits), its SHA-256 (hex) and
    when it was made (unix time)."""

    user: str
    id: str
    sha256: str
    created: float


def digest(key: str) -> str:
    """The SHA-256 of a key (hex): what the file stores and what a request's key is compared by."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def keys_file(home: Path) -> Path:
    """Where the gateway's keys live under LLMOS home ``home``: HOME/gateway/api_keys.json (the file need not
    exist: no keys)."""
    return home / "gateway" / "api_keys.json"


def check_user(user: str) -> str:
    """The user name, as the kernel's table bounds it; InvalidArgument otherwise."""
    if not (0 < len(user) <= USER_NAME["max_len"]) or not re.fullmatch(USER_PATTERN, user):
        raise InvalidArgument(f"user name {user!r} is not valid: {USER_NAME['pattern_doc']}, at most "
                              f"{USER_NAME['max_len']} characters")
    return user


def load(path: Path) -> list[ApiKey]:
    """The keys in ``path`` ([] when it does not exist); InvalidArgument for a file that is not ours."""
    try:
        raw = json.loads(path.read_text())
        return [ApiKey(**k) for k in raw["keys"]]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(f"{path} is not an API key file ({type(exc).__name__}: {exc}); move it away and "
                              f"add the keys again") from None


def _save(path: Path, keys: list[ApiKey]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)  # mkdir's mode is masked by the umask
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".api_keys.")  # mkstemp makes it 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": [asdict(k) for k in keys]}, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``path``'s read-modify-write (a lock file beside it: the keys file itself is
    replaced by rename, so a lock on it would guard a file that is about to go away)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path.parent / ".api_keys.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def add(path: Path, user: str) -> tuple[str, ApiKey]:
    """Make a fresh key for ``user``; returns (the key, shown once and stored nowhere, its entry).
    InvalidArgument for a bad user name or a file that is not an API key file."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    h = digest(key)
    entry = ApiKey(check_user(user), h[:ID_CHARS], h, time.time())
    with _locked(path):
        _save(path, [*load(path), entry])
    return key, entry


def remove(path: Path, user: str, key_id: str | None = None) -> int:
    """Withdraw ``user``'s keys (all, or the one whose id is ``key_id``); returns how many. NotFound when
    none matched."""
    with _locked(path):
        keys = load(path)
        keep = [k for k in keys if not (k.user == user and (key_id is None or k.id == key_id))]
        gone = len(keys) - len(keep)
        if not gone:
            raise NotFound(f"no API key {key_id!r} of user {user!r}" if key_id else f"user {user!r} has no API keys")
        _save(path, keep)
    return gone


class KeysUnreadable(Exception):
    """The gateway's keys file exists but is not an API key file: every request is refused until it is fixed
    (the gateway fails closed; the file's path goes to the gateway's log, never to an HTTP client)."""


class KeyRing:
    """The keys a running gateway accepts, re-read whenever the file changes (checked at each lookup:
    one stat)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int] | None = None
        self._users: dict[str, str] = {}

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
            seen = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            seen = None
        if seen != self._seen:
            try:
                keys = load(self.path)
            except InvalidArgument as exc:
                log.error("the API key file cannot be read, every request is refused (503): %s", exc.message)
                raise KeysUnreadable() from None
            self._users = {k.sha256: k.user for k in keys}
            self._seen = seen

    def configured(self) -> bool:
        """Whether any key exists now. KeysUnreadable for a file that is not an API key file."""
        self._refresh()
        return bool(self._users)

    def user_of(self, key: str) -> str | None:
        """The user a presented key stands for, or None for an unknown key. KeysUnreadable as configured()."""
        self._refresh()
        return self._users.get(digest(key))
