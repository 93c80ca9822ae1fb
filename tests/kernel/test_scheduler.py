import pytest

from llmos.kernel.scheduler import RunQueue, admit


def test_lower_nice_runs_first_and_equal_nice_runs_in_arrival_order():
    q = RunQueue()
    for pid, nice in [(1, 0), (2, 5), (3, -5), (4, 0), (5, -5)]:
        q.push(pid, nice)
    assert q.order() == [3, 5, 1, 4, 2]
    assert [q.pop() for _ in range(5)] == [3, 5, 1, 4, 2]
    assert q.pop() is None


def test_removed_pids_are_skipped():
    q = RunQueue()
    q.push(1, 0)
    q.push(2, 0)
    assert q.remove(1) and not q.remove(1)
    assert 1 not in q and len(q) == 1 and q.pop() == 2


def test_a_pid_cannot_be_queued_twice():
    q = RunQueue()
    q.push(1, 0)
    with pytest.raises(ValueError):
        q.push(1, 3)


def test_admit_fills_only_the_free_slots_best_first():
    q = RunQueue()
    for pid, nice in [(1, 3), (2, -1), (3, 0)]:
        q.push(pid, nice)
    assert admit(q, 2) == [2, 3]
    assert admit(q, 0) == [] and admit(q, 5) == [1]


def test_a_head_that_does_not_fit_blocks_smaller_processes_behind_it():
    q = RunQueue()
    for pid, nice in [(1, 0), (2, 0), (3, 5)]:
        q.push(pid, nice)
    asked = []

    def fits(pid):
        asked.append(pid)
        return pid != 1  # the head needs more memory than is free; the others would fit

    assert admit(q, 3, fits) == [] and asked == [1]
    assert q.order() == [1, 2, 3]  # nobody overtook the head
    assert admit(q, 3) == [1, 2, 3]
