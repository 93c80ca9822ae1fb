import pytest

from llmos.kernel.process import ProcessTable, State
from llmos.syscalls.errors import InvalidArgument, NoSuchProcess


def make(table, **kw):
    args = dict(owner="ann", model="m", priority=0, params={}, prompt_ids=[1, 2, 3])
    args.update(kw)
    return table.create(**args)


def test_pids_grow_and_are_never_reused_after_reaping():
    t = ProcessTable()
    a = make(t)
    a.transition(State.ZOMBIE)
    t.reap(a.pid)
    b = make(t)
    assert (a.pid, b.pid) == (1, 2)


def test_the_lifecycle_follows_the_architecture_and_refuses_illegal_moves():
    p = make(ProcessTable())
    assert p.state is State.NEW
    for s in (State.READY, State.RUNNING, State.READY, State.RUNNING, State.ZOMBIE):
        p.transition(s)
    with pytest.raises(RuntimeError):
        p.transition(State.RUNNING)


def test_only_zombies_are_reaped_and_reaped_pids_are_gone():
    t = ProcessTable()
    p = make(t)
    with pytest.raises(RuntimeError):
        t.reap(p.pid)
    p.transition(State.ZOMBIE)
    t.reap(p.pid)
    with pytest.raises(NoSuchProcess):
        t.get(p.pid)


def test_an_empty_prompt_is_refused():
    with pytest.raises(InvalidArgument):
        make(ProcessTable(), prompt_ids=[])


def test_stats_measure_queue_ttft_and_time_per_token():
    p = make(ProcessTable())
    p.created, p.admitted_at, p.first_token_at, p.last_token_at, p.finished_at = 10.0, 10.5, 11.0, 13.0, 13.0
    p.token_ids = [5, 6, 7, 8, 9]
    s = p.stats()
    assert s["queue_time_s"] == 0.5 and s["ttft_s"] == 1.0 and s["tpot_s"] == 0.5
    assert s["prompt_tokens"] == 3 and s["output_tokens"] == 5 and s["total_time_s"] == 3.0


def test_counts_cover_every_state():
    t = ProcessTable()
    make(t).transition(State.READY)
    counts = t.counts()
    assert counts["READY"] == 1 and set(counts) == {s.value for s in State}
