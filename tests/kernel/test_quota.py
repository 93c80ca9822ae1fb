"""Per-user limits and per-process timers, with time passed in."""

import pytest

from llmos.kernel.quota import Quotas, Timers, UserLimits
from llmos.syscalls.errors import QuotaExceeded, TryAgain


def test_a_zero_limit_says_the_user_may_not_run_instead_of_promising_a_retry():
    q = Quotas(users={"ann": UserLimits(max_procs=0), "bob": UserLimits(tokens_per_minute=0)})
    with pytest.raises(QuotaExceeded, match="may not run processes") as ann:
        q.check_start("ann", 0, 3, 1, now=0.0)
    with pytest.raises(QuotaExceeded, match="may not use tokens") as bob:
        q.check_start("bob", 0, 3, 1, now=0.0)
    assert "retry" not in ann.value.message and "retry" not in bob.value.message


def test_the_token_window_slides_and_says_when_enough_tokens_leave_it():
    q = Quotas(default=UserLimits(tokens_per_minute=100, max_procs=2))
    q.use_tokens("ann", 60, now=0.0)
    q.use_tokens("ann", 30, now=20.0)
    with pytest.raises(QuotaExceeded, match=r"retry in 60\.0 s"):
        q.check_start("ann", 0, 20, 1, now=0.0)
    with pytest.raises(QuotaExceeded, match=r"retry in 40\.0 s"):
        q.check_start("ann", 0, 20, 1, now=20.0)
    q.check_start("ann", 0, 20, 1, now=60.0)  # the first 60 tokens left the window
    with pytest.raises(TryAgain, match="2 live processes"):
        q.check_start("ann", 2, 1, 1, now=60.0)


def test_timers_keep_one_entry_per_pid_and_kind():
    t = Timers()
    t.arm(1, "deadline", 5.0)
    t.arm(1, "deadline", 9.0)  # re-armed: the earlier time no longer fires
    t.arm(2, "queue", 7.0)
    assert t.due(6.0) == [] and t.next_at() == 7.0
    t.cancel(2)
    assert t.due(8.0) == [] and t.due(9.0) == [(1, "deadline")] and t.next_at() is None
