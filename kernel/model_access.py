"""Who may use a model directory on the kernel's machine: the kernel reads it with its own rights, so a user
may name only what that user could read.

A model given as a directory path (not 'default', not a model in the store) is read by the kernel's
account. Without a check any user could point it at files only the kernel's owner may read (the kernel's
secret key, the owner's files: a symlink named tokenizer.json or chat_template.jinja, and the process's
prompt_ids give the bytes back). So, for a caller who is not the admin:

- a directory already loaded (by the admin, or by a user who passed this check) may be used;
- otherwise the caller must be a local user (ipc: its uid is known) who could read the directory and every
  file in it by the permission bits (every directory above it searchable, each file readable by its owner,
  group or other bits for that uid and its groups); no file may be a symlink that leads out of the directory,
  and nothing may lie under the kernel's home. tcp callers (their account on this machine is unknown) use
  models from the store, 'default', or what the admin loaded.

Raises NotPermitted (EPERM) saying which rule refused.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from llmos.syscalls.errors import NotPermitted, quote_path

MAX_FILES = 10_000  # files a model directory may hold for the check (model directories hold tens)


def is_model_dir(model: str | None) -> Path | None:
    """The directory ``model`` names on this machine, or None for 'default', a store model or a name."""
    if model is None or model == "default" or model.startswith("store:"):
        return None
    try:
        path = Path(model).expanduser()
    except RuntimeError:
        return None
    if not path.is_absolute():
        return None  # a store name: the store's rules apply
    try:
        if not path.exists() and model.startswith("/models/"):
            return None  # /models/<name>: the store's
    except OSError:
        pass
    return path


def groups_of(uid: int) -> set[int]:
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return set()
    return set(os.getgrouplist(pw.pw_name, pw.pw_gid)) | {pw.pw_gid}


def _allowed(st: os.stat_result, uid: int, gids: set[int], want: int) -> bool:
    """Whether ``uid`` (in ``gids``) has the ``want`` bits (4 read, 1 search/execute) on a file with ``st``."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid in gids:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return bits & want == want


def check_readable(path: Path, uid: int, home: Path) -> None:
    """NotPermitted unless ``uid`` could read the model directory ``path`` and every file in it (see above)."""
    gids = groups_of(uid)
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return  # nothing there: resolving the model says so (ENOENT), as for anyone
    if real == home.resolve() or home.resolve() in real.parents:
        raise NotPermitted(f"model {quote_path(str(path))} lies in the kernel's own home: not a model directory")
    for d in reversed(real.parents):
        if not _allowed(d.stat(), uid, gids, 1):
            raise NotPermitted(f"model {quote_path(str(path))}: you cannot reach it ({quote_path(str(d))} is closed "
                               f"to you), and the kernel reads it only for those who could")
    if not _allowed(real.stat(), uid, gids, 5):
        raise NotPermitted(f"model {quote_path(str(path))}: you cannot read that directory")
    count = 0
    for root, dirs, files in os.walk(real, followlinks=False):
        for name in [*dirs, *files]:
            count += 1
            if count > MAX_FILES:
                raise NotPermitted(f"model {quote_path(str(path))} holds more than {MAX_FILES} files")
            entry = Path(root) / name
            try:
                target = entry.resolve(strict=True)
                st = target.stat()
            except (OSError, RuntimeError):
                continue  # a dangling link: nothing to read
            if entry.is_symlink() and real not in target.parents:
                raise NotPermitted(f"model {quote_path(str(path))}: {quote_path(name)} is a link out of the "
                                   f"directory; copy the file in instead")
            want = 5 if stat.S_ISDIR(st.st_mode) else 4
            if not _allowed(st, uid, gids, want):
                raise NotPermitted(f"model {quote_path(str(path))}: you cannot read {quote_path(name)}, and the "
                                   f"kernel reads a model only for those who could")


def check_model_access(model: str | None, admin: bool, uid: int | None, transport: str, home: Path,
                       loaded: set[str]) -> None:
    """NotPermitted when a caller who is not the admin may not have the kernel read ``model`` (see above).
    ``loaded``: the resolved paths of the models loaded now."""
    path = is_model_dir(model)
    if admin or path is None:
        return
    try:
        if str(path.resolve()) in loaded:
            return
    except (OSError, RuntimeError):
        pass
    if uid is None:
        raise NotPermitted(f"model {quote_path(str(path))}: a model directory on the kernel's machine is loaded "
                           f"for {transport} callers only by the admin; use a model in the store (llmos model ls), "
                           f"'default', or one the admin loaded")
    check_readable(path, uid, home)
