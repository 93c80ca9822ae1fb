"""The docs name what the code defines: every kernel flag in docs/operations.md's table, every errno in
docs/protocol.md's table with the meaning syscalls/errors.py gives it."""

import re
from pathlib import Path

from llmos.kernel.config import FLAGS, add_flags
from llmos.syscalls.errors import Errno

DOCS = Path(__file__).resolve().parents[2] / "docs"


def section(doc: str, title: str) -> str:
    text = (DOCS / doc).read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_every_kernel_flag_has_a_row_in_the_operations_table():
    table = section("operations.md", "Kernel flags")
    rows = {m.group(1) for m in re.finditer(r"^\| `(--[a-z-]+)", table, re.M)}
    missing = [f.option for f in FLAGS if f.option not in rows]
    assert missing == [], f"docs/operations.md 'Kernel flags' lacks {missing}"


def test_the_table_has_no_row_for_a_flag_the_kernel_does_not_take():
    import argparse

    parser = argparse.ArgumentParser()
    add_flags(parser)
    known = {opt for a in parser._actions for opt in a.option_strings} | {"--home", "--address", "--parent-pid"}
    rows = {m.group(1) for m in re.finditer(r"^\| `(--[a-z-]+)", section("operations.md", "Kernel flags"), re.M)}
    assert rows - known == set()


def test_every_errno_has_a_row_in_the_protocol_table_or_is_said_never_to_be_sent():
    text = (DOCS / "protocol.md").read_text()
    rows = {(int(m.group(1)), m.group(2)) for m in re.finditer(r"^\| *(\d+) *\| *([A-Z0-9]+) *\|", text, re.M)}
    missing = [f"{e.name} ({int(e)})" for e in Errno
               if (int(e), e.name) not in rows and f"{e.name} ({int(e)})" not in text]
    assert missing == [], f"docs/protocol.md's errno table lacks {missing}"
    assert len(rows) >= 10  # the table was found
