"""The audit trail (kernel/audit.py) driven by a fake clock into a Logger on a StringIO: rate bounds per user
and for everyone, refill over time, the ``suppressed`` count, bounded fields."""

from __future__ import annotations

import io
import json

import pytest

from llmos.kernel import audit as audit_mod
from llmos.kernel.audit import BURST, GLOBAL_BURST, RATE_PER_S, Audit
from llmos.kernel.log import FIELD_CHARS, Logger


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def trail():
    """(audit, clock, lines): ``lines()`` parses what the audit wrote so far, one dict per log line."""
    stream, clock = io.StringIO(), FakeClock()
    audit = Audit(Logger("audit", stream=stream, ring=False), clock=clock)
    return audit, clock, lambda: [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_refusal_is_one_warning_line_naming_the_user_the_call_and_the_reason(trail):
    audit, _, lines = trail
    assert audit.refused("bob", "kill", "pid 7 is alice's", transport="ipc") is True
    assert audit.admin("root", "shutdown", why="shutdown") is True
    refused, admin = lines()
    assert (refused["level"], refused["event"], refused["user"], refused["call"], refused["reason"],
            refused["transport"]) == ("warning", "refused", "bob", "kill", "pid 7 is alice's", "ipc")
    assert (admin["level"], admin["event"], admin["user"], admin["call"]) == (
        "info", "admin_action", "root", "shutdown")
    assert "suppressed" not in refused and "suppressed" not in admin


def test_a_burst_of_refusals_is_cut_at_burst_lines_and_the_next_allowed_line_says_how_many_were_suppressed(trail):
    audit, clock, lines = trail
    written = [audit.refused("bob", "kill", f"try {i}") for i in range(BURST + 7)]
    assert written == [True] * BURST + [False] * 7
    assert len(lines()) == BURST
    clock.advance(1.0 / RATE_PER_S)  # one token back
    assert audit.refused("bob", "kill", "again") is True
    last = lines()[-1]
    assert last["reason"] == "again" and last["suppressed"] == 7
    clock.advance(1.0 / RATE_PER_S)
    audit.refused("bob", "kill", "once more")
    assert "suppressed" not in lines()[-1]  # the count was said once, then starts afresh


def test_one_users_flood_does_not_silence_another_users_lines(trail):
    audit, _, lines = trail
    for i in range(BURST * 3):
        audit.refused("mallory", "shutdown", "not the admin")
    assert audit.refused("alice", "kill", "pid 9 is bob's") is True
    assert audit.admin("root", "model_load") is True
    users = [line["user"] for line in lines()]
    assert users.count("mallory") == BURST and users[-2:] == ["alice", "root"]


def test_the_global_bound_holds_when_many_users_flood_together_and_each_is_told_what_it_lost(trail):
    audit, clock, lines = trail
    flooders = [f"u{i}" for i in range(GLOBAL_BURST // BURST)]  # together exactly the global burst
    for user in flooders:
        for _ in range(BURST):
            assert audit.refused(user, "kill", "no") is True
    assert len(lines()) == GLOBAL_BURST
    # a user with a full bucket of its own is cut by the bound for everyone
    assert audit.refused("quiet", "stat", "first line") is False
    assert len(lines()) == GLOBAL_BURST
    clock.advance(1.0)  # the global bucket refills (GLOBAL_PER_S), quiet's own bucket was never short
    assert audit.refused("quiet", "stat", "second line") is True
    last = lines()[-1]
    assert last["user"] == "quiet" and last["suppressed"] == 1 and last["suppressed_all_users"] == 1


def test_tokens_come_back_at_rate_per_s_and_never_above_the_burst(trail):
    audit, clock, lines = trail
    for _ in range(BURST):
        audit.refused("bob", "kill", "no")
    clock.advance(1.0)
    got = [audit.refused("bob", "kill", "no") for _ in range(int(RATE_PER_S) + 3)]
    assert got == [True] * int(RATE_PER_S) + [False] * 3
    clock.advance(3600.0)  # an hour of quiet refills the bucket to the burst, not to 18,000
    got = [audit.refused("bob", "kill", "no") for _ in range(BURST + 1)]
    assert got == [True] * BURST + [False]


def test_every_field_is_bounded_so_a_huge_reason_cannot_make_a_huge_line(trail):
    audit, _, lines = trail
    reason, call = "x" * 10_000, "y" * 5_000
    audit.refused("bob" * 1000, call, reason, path="/" + "z" * 20_000)
    (line,) = lines()
    assert line["reason"].startswith("x" * FIELD_CHARS) and line["reason"].endswith("(10000 characters)")
    assert len(line["reason"]) < FIELD_CHARS + 40 and len(line["call"]) < FIELD_CHARS + 40
    assert len(line["user"]) < FIELD_CHARS + 40 and len(line["path"]) < FIELD_CHARS + 40
    assert len(json.dumps(line)) < 5 * (FIELD_CHARS + 40)


def test_a_users_suppressed_count_survives_the_pruning_of_the_bucket_table(trail, monkeypatch):
    audit, clock, lines = trail
    flooders = [f"u{i}" for i in range(GLOBAL_BURST // BURST)]
    monkeypatch.setattr(audit_mod, "MAX_USERS", len(flooders) + 1)
    for user in flooders:
        for _ in range(BURST):
            audit.refused(user, "kill", "no")
    # cut by the global bound: quiet's own bucket is nearly full (the fullest are pruned first), yet it
    # owes a count
    assert audit.refused("quiet", "stat", "lost") is False
    clock.advance(1.0)
    assert audit.refused("newcomer", "ps", "no") is True  # the table is full: this prunes it
    assert audit.refused("quiet", "stat", "later") is True
    assert lines()[-1]["user"] == "quiet" and lines()[-1]["suppressed"] == 1


def test_the_bucket_table_stays_bounded_when_many_users_write_a_line_each(trail, monkeypatch):
    audit, _, lines = trail
    monkeypatch.setattr(audit_mod, "MAX_USERS", 50)
    for i in range(GLOBAL_BURST):
        assert audit.refused(f"user{i}", "ps", "no") is True
    assert len(audit._users) <= 50 and len(lines()) == GLOBAL_BURST
