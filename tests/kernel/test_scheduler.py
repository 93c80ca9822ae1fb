"""The run queue and the one decider, step by step with plain numbers: no loop, no sockets, time passed in."""

import pytest

from llmos.kernel.scheduler import (Capacity, RunQueue, SchedParams, Task, decide, level, may_preempt, queue_key,
                                    switch_mode)

P = SchedParams()


def test_lower_keys_run_first_and_equal_keys_run_in_arrival_order():
    q = RunQueue()
    for pid, key in [(1, 5), (2, 0), (3, 5), (4, -3)]:
        q.push(pid, key)
    assert q.order() == [4, 2, 1, 3]
    assert [q.pop() for _ in range(4)] == [4, 2, 1, 3]
    assert q.pop() is None


def test_a_pid_removed_and_pushed_again_has_exactly_one_entry():
    q = RunQueue()
    q.push(1, 0)
    q.push(2, 5)
    q.remove(1)
    q.push(1, 10)
    assert q.order() == [2, 1]
    assert len(q) == 2
    assert q.pop() == 2 and q.pop() == 1 and q.pop() is None


def test_pushing_a_queued_pid_replaces_its_entry_as_a_renice_does():
    q = RunQueue()
    q.push(1, 0)
    q.push(2, 5)
    q.push(1, 10)
    assert q.order() == [2, 1] and len(q) == 2


def test_the_heap_is_compacted_so_requeues_never_grow_it_without_bound():
    q = RunQueue()
    for i in range(10_000):
        q.push(7, i)
    assert len(q) == 1 and len(q._heap) <= 2 * len(q) + 17
    assert q.head(3) == [7]


def test_aging_raises_a_waiting_process_one_level_per_aging_period():
    key = queue_key(P, nice=10, now=100.0, waited=0.0, arrival=100.0)
    assert level(P, key, 100.0) == 10
    assert level(P, key, 100.0 + 4 * P.aging_s) == 6
    # a process that already waited 3 periods before this enqueue keeps that credit
    key2 = queue_key(P, nice=10, now=200.0, waited=3 * P.aging_s, arrival=100.0)
    assert level(P, key2, 200.0) == 7


def test_aging_orders_the_queue_so_a_long_wait_overtakes_a_better_nice_value():
    q = RunQueue()
    q.push(1, queue_key(P, nice=0, now=1000.0, waited=0.0, arrival=1000.0))
    q.push(2, queue_key(P, nice=5, now=0.0, waited=0.0, arrival=0.0))  # waited 1000 s: 200 levels earned
    q.push(3, queue_key(P, nice=5, now=999.0, waited=0.0, arrival=999.0))
    assert q.order() == [2, 1, 3]


def cap(max_batch=4, kv_total=100, swap_free=100, **kw):
    return Capacity(max_batch=max_batch, kv_total=kv_total, block_size=8, swap_free=swap_free, **kw)


def run(pid, nice=10, context=100, run_tokens=100, user="u", lvl=None):
    return Task(pid, user, nice, context, resident=(context + 1 + 7) // 8, level=float(nice if lvl is None else lvl),
                run_tokens=run_tokens)


def wait(pid, nice=0, context=10, user="u", lvl=None):
    return Task(pid, user, nice, context, level=float(nice if lvl is None else lvl))


def test_free_slots_and_blocks_admit_in_queue_order():
    plan = decide(P, cap(max_batch=3), [wait(5), wait(6), wait(7), wait(8)], [])
    assert plan.admit == [5, 6, 7] and not plan.preempt


def test_an_urgent_process_preempts_the_lowest_priority_running_one_when_the_batch_is_full():
    running = [run(1, nice=10), run(2, nice=10), run(3, nice=5), run(4, nice=10)]
    plan = decide(P, cap(max_batch=4), [wait(9, nice=-10)], running)
    assert plan.admit == [9]
    assert plan.preempt == [(4, "swap")]  # the worst level, newest first


def test_an_urgent_process_preempts_when_the_kv_pool_is_full_though_slots_are_free():
    running = [run(1, nice=10, context=390), run(2, nice=0, context=390)]  # 49 blocks each of 100
    plan = decide(P, cap(max_batch=8, kv_total=100), [wait(9, nice=-5, context=40)], running)
    assert plan.admit == [9] and plan.preempt == [(1, "swap")]


def test_no_preemption_without_a_better_level_and_none_within_one_nice_value():
    running = [run(1, nice=0), run(2, nice=0)]
    assert not decide(P, cap(max_batch=2), [wait(9, nice=0, lvl=-50)], running)  # same nice: FIFO
    assert not decide(P, cap(max_batch=2), [wait(9, nice=5)], running)  # worse
    # hysteresis: a waiting process must rank at least one level better than the running one
    aged = wait(9, nice=5, lvl=-0.5)
    assert not decide(P, cap(max_batch=2), [aged], running)
    assert decide(P, cap(max_batch=2), [wait(9, nice=5, lvl=-1.0)], running).preempt


def test_a_process_admitted_by_aging_keeps_its_level_for_its_quantum():
    admitted_aged = run(1, nice=10, lvl=-5, run_tokens=P.quantum_tokens - 1)
    assert not may_preempt(P, wait(9, nice=0), admitted_aged)
    spent = run(1, nice=10, lvl=-5, run_tokens=P.quantum_tokens)
    assert may_preempt(P, wait(9, nice=0), spent)


def test_aging_lets_a_low_priority_process_preempt_after_waiting_long_enough():
    running = [run(1, nice=0)]
    assert not decide(P, cap(max_batch=1), [wait(9, nice=10, lvl=10)], running)
    assert decide(P, cap(max_batch=1), [wait(9, nice=10, lvl=-1)], running).preempt == [(1, "swap")]


def test_the_head_that_cannot_be_placed_blocks_the_ones_behind_it():
    running = [run(1, nice=0, context=700)]  # 88 of 100 blocks
    plan = decide(P, cap(max_batch=8, kv_total=100), [wait(5, nice=0, context=200), wait(6, nice=0, context=8)],
                  running)
    assert not plan


def test_an_empty_pool_takes_a_process_that_can_never_fit_so_the_engine_can_refuse_it():
    plan = decide(P, cap(max_batch=8, kv_total=10), [wait(5, context=500)], [])
    assert plan.admit == [5]


def test_idle_sessions_give_way_before_any_running_process():
    running = [run(1, nice=10, context=300)]  # 38 blocks
    idle = [Task(7, "u", 0, 470, resident=60, level=0.0)]  # 38 + 60 of 100 blocks used
    plan = decide(P, cap(max_batch=8, kv_total=100), [wait(9, nice=0, context=60)], running, idle)
    assert plan.evict == [(7, "swap")] and not plan.preempt and plan.admit == [9]


def test_a_users_kv_quota_holds_its_process_back_and_lets_others_pass():
    running = [run(1, nice=0, context=300, user="ann")]  # ann holds 38 blocks
    c = cap(max_batch=8, kv_total=1000, user_kv_cap={"ann": 40})
    plan = decide(P, c, [wait(5, context=100, user="ann"), wait(6, context=100, user="bob")], running)
    assert plan.admit == [6]


def test_swap_is_chosen_when_cheaper_than_recompute_and_recompute_when_the_swap_area_is_full():
    t = run(1, context=512)
    fast_copy = cap(kv_bytes_per_token=32768, swap_bytes_per_s=5e9, prefill_tokens_per_s=2000.0)
    assert switch_mode(t, fast_copy, swap_free=1000) == "swap"
    assert switch_mode(t, fast_copy, swap_free=10) == "recompute"
    slow_copy = cap(kv_bytes_per_token=32768, swap_bytes_per_s=1e6, prefill_tokens_per_s=2000.0)
    assert switch_mode(t, slow_copy, swap_free=1000) == "recompute"


def test_fcfs_never_preempts_and_fair_interleaves_users():
    fcfs = SchedParams(policy="fcfs")
    assert not decide(fcfs, cap(max_batch=1), [wait(9, nice=-20)], [run(1, nice=19)])
    fair = SchedParams(policy="fair")
    ready = [wait(1, user="ann"), wait(2, user="ann"), wait(3, user="ann"), wait(4, user="bob")]
    assert decide(fair, cap(max_batch=2), ready, []).admit == [1, 4]
    # bob runs nothing while ann runs three: bob's process takes the place of ann's last one
    running = [run(5, user="ann"), run(6, user="ann"), run(7, user="ann")]
    assert decide(fair, cap(max_batch=3), [wait(8, user="bob")], running).preempt == [(7, "swap")]


def test_the_workers_reported_kv_use_is_a_floor_under_the_kernels_estimate():
    assert decide(P, cap(max_batch=8, kv_total=100), [wait(9, context=40)], []).admit == [9]
    assert not decide(P, cap(max_batch=8, kv_total=100, kv_used=96), [wait(9, context=40)],
                      [run(1, nice=0, context=8)])


def test_the_decider_is_pure():
    ready, running = [wait(9, nice=-10)], [run(1), run(2)]
    a = decide(P, cap(max_batch=2), ready, running)
    b = decide(P, cap(max_batch=2), ready, running)
    assert a == b and [t.pid for t in running] == [1, 2]


def test_bad_policy_knobs_are_refused():
    with pytest.raises(ValueError):
        SchedParams(policy="lottery")
    with pytest.raises(ValueError):
        SchedParams(aging_s=0)


def test_a_user_over_its_kv_cap_gives_way_by_its_own_worst_process_and_a_lone_one_is_named():
    c = cap(max_batch=8, kv_total=1000, user_kv_cap={"ann": 30})
    running = [run(1, nice=0, context=100, user="ann"), run(2, nice=5, context=100, user="ann"),
               run(3, nice=0, context=300, user="bob")]  # ann holds 13 + 13 blocks... over 30 once grown
    assert not decide(P, c, [], running)
    grown = [run(1, nice=0, context=150, user="ann"), run(2, nice=5, context=150, user="ann"), running[2]]
    plan = decide(P, c, [], grown)  # ann holds 19 + 19 = 38 > 30: her worst gives way, bob untouched
    assert plan.preempt == [(2, "swap")] and not plan.over_quota
    alone = decide(P, c, [], [run(1, nice=0, context=300, user="ann")])  # one process over the cap by itself
    assert alone.over_quota == [1] and not alone.preempt
    idle = [Task(7, "ann", 0, 150, resident=19, level=0.0)]
    plan = decide(P, c, [], [run(1, nice=0, context=150, user="ann")], idle)  # her idle session goes first
    assert plan.evict == [(7, "swap")] and not plan.preempt and not plan.over_quota
