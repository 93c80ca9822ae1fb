"""The table is the single source of truth: every syscall has a handler, client methods and docs."""

import inspect
import re
from pathlib import Path

import pytest

from llmos import AsyncClient, Client
from llmos.kernel.handlers import Handlers
from llmos.syscalls.errors import Errno, NoSuchSyscall
from llmos.syscalls.table import BY_NAME, BY_NR, SYSCALLS, lookup

DOC = (Path(__file__).resolve().parents[2] / "docs" / "syscalls.md").read_text()


def test_numbers_and_names_are_unique():
    assert len({s.nr for s in SYSCALLS}) == len(SYSCALLS) == len({s.name for s in SYSCALLS})


@pytest.mark.parametrize("sc", SYSCALLS, ids=lambda s: s.name)
def test_every_syscall_has_a_handler_two_client_methods_and_a_doc_entry(sc):
    assert inspect.iscoroutinefunction(getattr(Handlers, "sys_" + sc.name, None)), f"no sys_{sc.name}"
    assert callable(getattr(Client, sc.name, None)), f"Client.{sc.name} missing"
    assert callable(getattr(AsyncClient, sc.name, None)), f"AsyncClient.{sc.name} missing"
    heading = re.search(rf"^## {sc.nr} `{sc.name}`$", DOC, re.M)
    assert heading, f"docs/syscalls.md has no '## {sc.nr} `{sc.name}`' entry"
    section = DOC[heading.end():].split("\n## ", 1)[0]
    for field in sc.request:
        assert f"`{field.name}`" in section, f"{sc.name}: field {field.name} undocumented"
    for err in sc.errors:
        assert err.name in section, f"{sc.name}: error {err.name} undocumented"


def test_the_doc_lists_no_syscall_the_table_lacks():
    documented = re.findall(r"^## (\d+) `(\w+)`$", DOC, re.M)
    assert sorted((int(n), name) for n, name in documented) == sorted((s.nr, s.name) for s in SYSCALLS)


def test_no_handler_exists_without_a_table_entry():
    extra = [n[4:] for n in dir(Handlers) if n.startswith("sys_") and n[4:] not in BY_NAME]
    assert extra == []


def test_lookup_accepts_names_and_numbers_and_refuses_the_rest():
    assert lookup("spawn") is BY_NAME["spawn"] and lookup(10) is BY_NR[10]
    for bad in ("nope", 999, True, None, 1.5):
        with pytest.raises(NoSuchSyscall):
            lookup(bad)


def test_declared_errors_are_errnos():
    assert all(isinstance(e, Errno) for s in SYSCALLS for e in s.errors)


def test_the_syscalls_package_imports_nothing_from_kernel_or_userland():
    root = Path(__file__).resolve().parents[2] / "syscalls"
    for path in root.glob("*.py"):
        imports = re.findall(r"^\s*(?:from|import)\s+(llmos[\w.]*)", path.read_text(), re.M)
        assert all(name.startswith("llmos.syscalls") for name in imports), (path, imports)


def test_docs_syscalls_md_is_the_rendering_of_the_table():
    from llmos.syscalls.doc import render

    assert DOC == render(), "regenerate: python -m llmos.syscalls.doc > docs/syscalls.md"
