"""Who may read or write where in the namespace: the one function the kernel's fs handlers call.

| area              | read                               | write                                           |
|-------------------|------------------------------------|-------------------------------------------------|
| /home/<user>/...  | that user, the admin               | that user, the admin                            |
| /models/...       | everyone                           | the admin                                       |
| /data/...         | everyone                           | anyone creates; the file's owner or the admin replaces/removes (sticky) |
| /proc/<pid>/...   | the process's owner, the admin     | nobody (only the kernel); its owner and the admin remove its captures |
| /var/log/...      | everyone                           | nobody (only the kernel)                        |
| /, /home, /var    | everyone (a listing)               | nobody                                          |
| anything else     | EINVAL: no such namespace          | EINVAL                                          |

Directories are implied, so a directory's listing is read with owner_of_file None; under /proc a
path with no file (a listing, or a missing file that then answers ENOENT) is readable by everyone,
as Linux shows every pid in /proc.
"""

from __future__ import annotations

from llmos.drivers.storage.paths import normpath
from llmos.syscalls.errors import InvalidArgument, NotPermitted, quote, quote_path

NAMESPACES = "/models, /data, /proc, /home, /var/log"
_LISTABLE = {"/", "/home", "/var", "/models", "/data", "/proc", "/var/log"}


def may(user: str, op: str, path: str, admins: set[str] | frozenset[str], owner_of_file: str | None) -> None:
    """Return if ``user`` may ``op`` ("read" | "write" | "remove") ``path``; raise NotPermitted (EPERM) naming
    the rule otherwise, InvalidArgument (EINVAL) outside the namespaces or for a bad op or path. "remove" is
    "write", except that a process's owner (and the admin) may remove its captures (/proc/<pid>/capture/...),
    which the kernel alone writes: that frees the user's capture quota.

    ``owner_of_file``: the owner of the file at ``path`` if one exists, else None (creation, a listing).
    """
    if op not in ("read", "write", "remove"):
        raise InvalidArgument(f"op must be 'read', 'write' or 'remove', not {quote(op)}")
    path = normpath(path)
    admin = user in admins
    if op == "remove" and not path.startswith("/proc/"):
        op = "write"
    parts = path.strip("/").split("/") if path != "/" else []
    area = parts[0] if parts else ""
    if path in _LISTABLE:
        if op == "read":
            return
        raise NotPermitted(f"{quote_path(path)} is a directory of the namespace; nobody writes it as a file")
    if area == "home" and len(parts) >= 2:
        if user == parts[1] or admin:
            return
        raise NotPermitted(f"{quote_path(path)} is in {parts[1]}'s home: only {parts[1]} and the admin "
                           f"{'read' if op == 'read' else 'write'} there")
    if area == "models":
        if op == "read" or admin:
            return
        raise NotPermitted(f"only the admin writes /models ({quote_path(path)}); everyone reads it")
    if area == "data":
        if op == "read" or admin or owner_of_file is None or owner_of_file == user:
            return
        raise NotPermitted(f"{quote_path(path)} belongs to {owner_of_file}: in /data anyone creates, only the "
                           f"file's owner or the admin replaces or removes")
    if area == "proc":
        if op == "remove" and len(parts) >= 3 and parts[2] == "capture" and (admin or owner_of_file == user):
            return
        if op != "read":
            raise NotPermitted(f"only the kernel writes /proc ({quote_path(path)})")
        if owner_of_file is None or owner_of_file == user or admin:
            return
        raise NotPermitted(f"{quote_path(path)} belongs to {owner_of_file}'s process: only its owner and the "
                           f"admin read it")
    if area == "var" and len(parts) >= 2 and parts[1] == "log":
        if op == "read":
            return
        raise NotPermitted(f"only the kernel writes /var/log ({quote_path(path)}); everyone reads it")
    raise InvalidArgument(f"no such namespace: {quote_path(path)}; the store has {NAMESPACES}")
