"""The client's methods follow the syscall table: every syscall's method carries the table's description
and errors, and the wire shapes of the new calls (spawn's session fields, turns, records) are read right."""

import inspect

import pytest

from llmos import AsyncClient, Client
from llmos._wire import session_spawns, spawn_args
from llmos.syscalls.table import SYSCALLS
from llmos.types import ProcessInfo, TurnResult


@pytest.mark.parametrize("sc", [s for s in SYSCALLS if s.name != "close"], ids=lambda s: s.name)
def test_every_syscall_method_is_documented_from_the_table(sc):
    for cls in (Client, AsyncClient):
        doc = inspect.getdoc(getattr(cls, sc.name)) or ""
        assert doc.startswith(sc.doc), f"{cls.__name__}.{sc.name}: docstring does not start with the table's doc"
        for err in sc.errors:
            assert err.name in doc, f"{cls.__name__}.{sc.name}: {err.name} not in its docstring"


def test_close_with_a_pid_is_the_close_syscall_and_without_one_disconnects():
    for cls in (Client, AsyncClient):
        params = inspect.signature(cls.close).parameters
        assert list(params) == ["self", "pid"] and params["pid"].default is None
        assert "``close`` syscall" in inspect.getdoc(cls.close)


def test_spawn_sends_session_only_when_asked_and_drops_unset_limits():
    plain = spawn_args("hi", None, None, 0, {"session": False, "deadline": None, "queue_timeout": None})
    assert plain == {"prompt": "hi", "priority": 0}
    sess = spawn_args(None, None, None, 5, {"session": True, "deadline": 2.5, "queue_timeout": None})
    assert sess == {"priority": 5, "session": True, "deadline": 2.5}


def test_a_session_with_a_system_prompt_tries_the_system_message_then_no_prompt():
    assert session_spawns("Be brief.") == [{"messages": [{"role": "system", "content": "Be brief."}]}, {}]
    assert session_spawns(None) == [{}]


def test_a_turn_and_a_record_are_built_from_their_wire_maps():
    t = TurnResult.from_wire({"pid": 3, "state": "BLOCKED", "text": "yo", "token_ids": [1, 2], "finish_reason": "stop",
                              "error": None, "extra": 1,
                              "stats": {"prefill_tokens": 4, "context_tokens": 20, "output_tokens": 2, "new": 0}})
    assert t.stats.prefill_tokens == 4 and t.stats.context_tokens == 20 and t.state == "BLOCKED"
    p = ProcessInfo.from_wire({"pid": 3, "state": "STOPPED", "priority": -2, "model": "m", "session": True,
                               "kv_blocks": 7, "preemptions": 1, "sched": {"swaps_out": 1}, "unknown": 0})
    assert p.session and p.kv_blocks == 7 and p.preemptions == 1 and p.sched == {"swaps_out": 1}
    old = ProcessInfo.from_wire({"pid": 1, "state": "READY", "priority": 0, "model": "m"})  # an older kernel's
    assert old.kv_blocks == 0 and not old.session and old.sched == {}


def test_the_new_errnos_raise_their_own_classes():
    import llmos
    from llmos.syscalls.errors import error_from_errno

    for errno, cls in ((122, llmos.QuotaExceeded), (11, llmos.TryAgain), (16, llmos.Busy), (1, llmos.NotPermitted)):
        exc = error_from_errno(errno, "limit")
        assert type(exc) is cls and isinstance(exc, llmos.LLMOSError)
