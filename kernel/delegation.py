"""Acting for another user: which accounts the admin lets speak for which users (a gateway, a service).

A request frame may carry ``"for": USER`` (docs/protocol.md). The connection's own user, proven by its
transport (kernel/identity.py), is then a *delegate*, and the call is made as USER: USER owns what it
spawns, USER's quotas count it, and every access rule of the syscall table applies to USER. Who may be a
delegate is the admin's choice, made when the kernel starts (``--delegate NAME[=USER,USER][;NAME...]``):

- the admin (the kernel's owner, root) may act for any user;
- a named delegate may act for the users listed after its name, or for every user when none is listed,
  but never for an admin (acting for the admin would make a gateway the admin);
- anyone else asking to act for another user is refused (EPERM, audited).

A call made for USER is never the admin's unless USER is an admin and the delegate is the admin too. The
kernel does not know USER's account on this machine, so model directories are for it what they are for a
tcp caller (kernel/model_access.py: models in the store, 'default', or what the admin loaded).
Idea: Unix's sudoers (who may run as whom) and HTTP gateways' "on behalf of" headers; the rule itself is
this kernel's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmos.syscalls.errors import InvalidArgument, NotPermitted, quote
from llmos.syscalls.table import USER_NAME

DELEGATED = "delegated"  # the transport of a call made for another user: its identity is the delegate's word
_NAME = re.compile(USER_NAME["pattern"])


def parse_delegates(spec: str | None) -> dict[str, frozenset[str] | None]:
    """'gateway;svc=alice,bob' -> {'gateway': None (any user), 'svc': {'alice', 'bob'}}; ValueError saying
    what is wrong."""
    out: dict[str, frozenset[str] | None] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(";"))):
        name, sep, users = part.partition("=")
        name = name.strip()
        if len(name) > USER_NAME["max_len"] or not _NAME.fullmatch(name):
            raise ValueError(f"{part!r}: expected NAME[=USER,USER...], with NAME a user name")
        if not sep:
            out[name] = None
            continue
        listed = frozenset(u.strip() for u in users.split(",") if u.strip())
        if not listed or not all(len(u) <= USER_NAME["max_len"] and _NAME.fullmatch(u) for u in listed):
            raise ValueError(f"{part!r}: expected NAME=USER,USER..., one user name or more after '='")
        out[name] = listed
    return out


@dataclass(frozen=True)
class Delegation:
    """Who may act for whom (see the module's docstring). ``delegates``: name -> the users it may act for
    (None: any user who is not an admin); ``admins``: the kernel's admins."""

    delegates: dict[str, frozenset[str] | None]
    admins: frozenset[str]

    def check(self, user: str, admin: bool, target: object) -> str:
        """The user a call by ``user`` (``admin``: whether it is an admin) asks to be made for, ``target``;
        InvalidArgument (EINVAL) for a target that is not a user name, NotPermitted (EPERM) when ``user``
        may not act for it."""
        if not isinstance(target, str) or len(target) > USER_NAME["max_len"] or not _NAME.fullmatch(target):
            raise InvalidArgument(f"'for' must be a user name ({USER_NAME['pattern_doc']}, at most "
                                  f"{USER_NAME['max_len']}), got {quote(target)}")
        if admin or target == user:
            return target
        if user not in self.delegates:
            raise NotPermitted(f"{user} may not act for other users (the admin names who may: llmos kernel "
                               f"start --delegate {user})")
        if target in self.admins:
            raise NotPermitted(f"{user} may not act for {target}: an admin acts only for itself")
        allowed = self.delegates[user]
        if allowed is not None and target not in allowed:
            raise NotPermitted(f"{user} may act only for {', '.join(sorted(allowed))}, not {target}")
        return target
