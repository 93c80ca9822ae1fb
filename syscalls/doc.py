"""Render docs/syscalls.md from the table: ``python -m llmos.syscalls.doc > docs/syscalls.md``."""

from __future__ import annotations

from llmos.syscalls.errors import Errno
from llmos.syscalls.schema import Field
from llmos.syscalls.table import SYSCALLS

HEADER = """# Syscalls

Generated from `syscalls/table.py` by `python -m llmos.syscalls.doc > docs/syscalls.md`;
tests/syscalls/test_table.py fails when this file and the table disagree. Frames and
error replies are described in [protocol.md](protocol.md). A call is named by its name
or its number in the request's `call` field; its arguments go in `args`.

| nr | name | streams | what it does |
|---:|---|---|---|
"""


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


def render() -> str:
    lines = [HEADER.rstrip("\n")]
    for s in SYSCALLS:
        lines.append(f"| {s.nr} | [`{s.name}`](#{s.nr}-{s.name}) | {'yes' if s.streams else ''} | {s.doc} |")
    lines.append("")
    for s in SYSCALLS:
        lines += [f"## {s.nr} `{s.name}`", "", s.doc, ""]
        lines += _fields("Request `args`", s.request)
        if s.streams:
            lines += _fields("Each `chunk` frame's `data`", s.chunk)
        lines += _fields("Reply `result`", s.reply)
        errs = ", ".join(f"{e.name} ({int(e)})" for e in s.errors) or "none beyond the common ones"
        lines += [f"Errors: {errs}. Any call may also answer EPROTO, ENOSYS, EINVAL (bad args) or EIO.", ""]
    lines += ["## Error codes", "", "| errno | name |", "|---:|---|"]
    lines += [f"| {int(e)} | {e.name} |" for e in Errno]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
