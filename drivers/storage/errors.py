"""LMDB's exceptions turned into llmos errors: ENOSPC (NoSpace) for a full disk, EIO otherwise.

Nothing lmdb-specific leaves the storage package: every public function catches ``lmdb.Error`` (and
the OSError of opening files) and raises what ``storage_error`` makes of it.
"""

from __future__ import annotations

import errno as _errno
import os
from pathlib import Path

import lmdb

from llmos.syscalls.errors import DeviceError, LLMOSError, NoSpace

# After a failed commit, a filesystem with less than this much free space counts as full: LMDB reports a
# short write (the disk filled part-way through a page run) as EIO, not ENOSPC (mdb.c, mdb_page_flush:
# "short write, filesystem full?"), so the free space is what tells a full disk from a failing one.
FULL_BELOW_BYTES = 1 << 20


class StorageError(DeviceError):
    """Raised when the store itself fails (EIO): an LMDB error that is not a full disk, a corrupt or
    unreadable file, or a Store used where it cannot work (a forked child, after close).

    Differs from NoSpace (ENOSPC), which says the disk is full and the store is intact.
    """


def free_bytes(where: Path | str | None) -> int | None:
    """Bytes free for an unprivileged writer on the filesystem holding ``where``; None if unknown."""
    if where is None:
        return None
    try:
        st = os.statvfs(where)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def storage_error(exc: BaseException, where: Path | str | None = None, doing: str = "") -> LLMOSError:
    """The llmos error for ``exc`` raised by LMDB or the OS while working on the store at ``where``.

    An LLMOSError passes through unchanged. ENOSPC, and EIO while the filesystem has under
    FULL_BELOW_BYTES free (LMDB's short write), give NoSpace; everything else StorageError (EIO).
    The message names the store, what was being done, and the cause.
    """
    if isinstance(exc, LLMOSError):
        return exc
    code = getattr(exc, "code", None) if isinstance(exc, lmdb.Error) else getattr(exc, "errno", None)
    cause = f"{type(exc).__name__}: {exc}"
    place = f"store {str(where)!r}" if where is not None else "store"
    action = f" while {doing}" if doing else ""
    if code == _errno.ENOSPC or (code == _errno.EIO and _is_full(where)):
        free = free_bytes(where)
        left = f" ({free} bytes free)" if free is not None else ""
        return NoSpace(f"{place}: no space left on the device{left}{action}; nothing of this write was kept ({cause})")
    if isinstance(exc, lmdb.MapFullError):
        return StorageError(f"{place}: the memory map is full{action} and could not grow ({cause})")
    return StorageError(f"{place}: the store failed{action} ({cause})")


def _is_full(where: Path | str | None) -> bool:
    free = free_bytes(where)
    return free is not None and free < FULL_BELOW_BYTES
