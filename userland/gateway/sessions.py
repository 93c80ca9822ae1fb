"""Which caller opened each session this gateway started: only that caller may continue or close it.

The kernel's own rule (a process's owner or the admin) is not enough behind a gateway: without API keys
every request is the gateway's own identity, and with them a gateway run by the admin could reach any
process. So a session pid is usable through the gateway only by the caller (an API key's user, or None:
keyless) whose request opened it here; any other pid is answered as an unknown session (404), whether or
not the kernel has it. The map lives as long as the gateway: a restarted gateway forgets its sessions.
"""

from __future__ import annotations

from llmos.gateway.errors import HTTPError


class SessionOwners:
    """pid -> the caller that opened it (None: a keyless request)."""

    def __init__(self) -> None:
        self._owner: dict[int, str | None] = {}

    def opened(self, pid: int, caller: str | None) -> None:
        """Session ``pid`` was opened here for ``caller``."""
        self._owner[pid] = caller

    def check(self, pid: int, caller: str | None) -> None:
        """404 (ESRCH, ``param: session``) unless ``caller`` opened session ``pid`` through this gateway."""
        if pid not in self._owner or self._owner[pid] != caller:
            raise HTTPError(404, f"no session {pid} (a session is continued or closed through the gateway that "
                            f"opened it, by the same caller)", "invalid_request_error", "session", "ESRCH")

    def ended(self, pid: int) -> None:
        """Session ``pid`` is gone (closed, ended by a turn or a client that went away, unknown to the kernel)."""
        self._owner.pop(pid, None)
