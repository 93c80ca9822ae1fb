"""Render docs/syscalls.md from the table: ``python -m llmos.syscalls.doc > docs/syscalls.md``."""

from __future__ import annotations

from llmos.syscalls import protocol
from llmos.syscalls.errors import MEANING, Errno
from llmos.syscalls.schema import Field
from llmos.syscalls.table import DELEGATION, SYSCALLS

HEADER = """# Syscalls

Generated from `syscalls/table.py` by `python -m llmos.syscalls.doc > docs/syscalls.md`;
tests/syscalls/test_table.py fails when this file and the table disagree. Frames and
error replies are described in [protocol.md](protocol.md). A call is named by its name
or its number in the request's `call` field; its arguments go in `args`.

Bounds: a frame is at most {frame}, a string {string}, an array {array:,} items, a map {map:,}
keys (protocol.md); a field's own bounds are in its notes. Float fields accept ints.

Who may call: the caller is the user the transport proves (protocol.md, Identity); the kernel's
dispatcher checks the column below before the call runs and answers EPERM otherwise. "The admin" is
the kernel's owner and root.

Acting for another user: {delegation}.

| nr | name | streams | who may call | what it does |
|---:|---|---|---|---|
"""


COMMON_ERRORS = ("Any call may also answer EPROTO (malformed request), ENOSYS, EINVAL (bad args), "
                 "EMSGSIZE (over a bound), EAGAIN (unread replies over this client's buffer), "
                 "EPIPE (kernel stopping) or EIO.")


def _fields(title: str, fields: tuple[Field, ...]) -> list[str]:
    if not fields:
        return [f"{title}: none.", ""]
    out = [f"{title}:", "", "| field | type | notes |", "|---|---|---|"]
    for f in fields:
        notes = f.describe().split("; ", 1)
        extra = notes[1] if len(notes) > 1 else ""
        doc = f"{f.doc}. {extra}" if f.doc and extra else (f.doc or extra)
        out.append(f"| `{f.name}` | {notes[0]} | {doc.replace('|', '/')} |")
    out.append("")
    return out


def _mib(n: int) -> str:
    return f"{n // 2**20} MiB"


def render() -> str:
    lines = [HEADER.rstrip("\n").format(frame=_mib(protocol.MAX_FRAME_BYTES), string=_mib(protocol.MAX_STR_BYTES),
                                          array=protocol.MAX_ARRAY_LEN, map=protocol.MAX_MAP_LEN,
                                          delegation=DELEGATION)]
    for s in SYSCALLS:
        who = s.access.describe() if s.access.who != "path" else "by path (see the call)"
        lines.append(f"| {s.nr} | [`{s.name}`](#{s.nr}-{s.name}) | {'yes' if s.streams else ''} | {who} | {s.doc} |")
    lines.append("")
    for s in SYSCALLS:
        lines += [f"## {s.nr} `{s.name}`", "", s.doc, "", f"Who may call: {s.access.describe()}.", ""]
        lines += _fields("Request `args`", s.request)
        if s.streams:
            lines += _fields("Each `chunk` frame's `data`", s.chunk)
        lines += _fields("Reply `result`", s.reply)
        errs = ", ".join(f"{e.name} ({int(e)})" for e in s.errors) or "none beyond the common ones"
        lines += [f"Errors: {errs}. {COMMON_ERRORS}", ""]
    lines += ["## Error codes", "", "| errno | name | meaning |", "|---:|---|---|"]
    lines += [f"| {int(e)} | {e.name} | {MEANING[e]} |" for e in Errno]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
