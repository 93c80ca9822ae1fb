"""Context switches on both engines (tiny real models): preempt by swap or recompute, park, resume exactly,
the bounded swap area, memory pressure reported as events, idle sessions giving way, session turns."""

import pytest

from llmos.drivers.model.engine import load_engine

GREEDY = {"temperature": 0.0, "ignore_eos": True}
SAMPLED = {"temperature": 1.3, "top_p": 0.95, "seed": 11, "ignore_eos": True}
KINDS = ["paged", "sequential"]


@pytest.fixture(scope="module")
def engines(tiny_model, tmp_path_factory):
    """One engine per kind, shared by the tests that leave it empty; "gpt2": the sequential engine on a
    model that is not a Llama (another transformers cache)."""
    from tests.tinymodel import make_tiny_gpt2

    gpt2 = make_tiny_gpt2(tmp_path_factory.mktemp("models") / "gpt2")
    # the prefix cache off: these tests count what a switch recomputes (test_prefix_cache.py: the same paths with it on)
    made = {kind: load_engine(tiny_model, engine=kind, block_size=4, prefix_cache=False) for kind in KINDS}
    made["gpt2"] = load_engine(gpt2, block_size=4)
    assert made["gpt2"].kind == "sequential"
    yield made
    for e in made.values():
        assert not e.seqs and e.pool.usage().used == 0 and e.swap_used == 0  # every test cleaned up


def tokens(events, pid):
    return [t for ev in events if ev.pid == pid for t in ev.token_ids]


def drain(engine, limit=2000):
    """Step until nothing is active; every event, in order."""
    out = []
    for _ in range(limit):
        if not engine.has_work():
            return out
        out += engine.step()
    raise AssertionError("the engine kept working")


def step_until_tokens(engine, pid, n):
    """Step until ``pid`` has ``n`` new tokens; the events."""
    out = []
    while len(tokens(out, pid)) < n:
        out += engine.step()
    return out


def uninterrupted(engine, prompt, params, n):
    engine.add(99, prompt, {**params, "max_new_tokens": n})
    return tokens(drain(engine), 99)


def switched(engine, prompt, params, n, mode, after=7):
    """Run ``prompt``, preempt it with ``mode`` after ``after`` tokens, let another sequence take the freed
    blocks meanwhile, resume it; its tokens, the preemption event and the events after the resume."""
    engine.add(1, prompt, {**params, "max_new_tokens": n})
    events = step_until_tokens(engine, 1, after)
    computed = engine.seqs[1].computed
    ev = engine.preempt(1, mode)
    assert engine.seqs[1].parked and not engine.pool.tables.get(1) and not engine.has_work()
    assert engine.step() == []  # a parked sequence does not run, and nothing resumes it
    engine.add(2, prompt[::-1], {**GREEDY, "max_new_tokens": 5})  # reuses the freed blocks
    drain(engine)
    assert engine.seqs[1].parked
    engine.resume(1, 0)
    after_resume = drain(engine)
    return tokens(events + after_resume, 1), ev, computed, after_resume


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("kind", [*KINDS, "gpt2"])
def test_a_greedy_sequence_swapped_out_and_resumed_yields_the_uninterrupted_tokens(engines, kind, params):
    e = engines[kind]
    prompt = e.encode("context switch")
    ref = uninterrupted(e, prompt, params, 24)
    swaps_in, swaps_out = e.swaps_in, e.swaps_out
    got, ev, computed, after = switched(e, prompt, params, 24, "swap")
    assert (ev.pid, ev.preempted, ev.recomputed) == (1, "swap", 0) and computed > 0
    assert got == ref
    assert (e.swaps_out, e.swaps_in) == (swaps_out + 1, swaps_in + 1) and e.swap_used == 0
    assert sum(x.prefilled for x in after) == 0  # swapped back, nothing recomputed


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_greedy_sequence_preempted_to_recompute_and_resumed_yields_the_uninterrupted_tokens(engines, kind, params):
    e = engines[kind]
    prompt = e.encode("context switch")
    ref = uninterrupted(e, prompt, params, 24)
    recomputed = e.recomputed_tokens
    got, ev, computed, after = switched(e, prompt, params, 24, "recompute")
    assert (ev.preempted, ev.recomputed) == ("recompute", computed) and e.recomputed_tokens == recomputed + computed
    assert got == ref
    assert after[0].prefilled == computed  # the resume computes again what was dropped, in its first step


@pytest.mark.parametrize("kind", KINDS)
def test_swap_area_full_falls_back_to_recompute(tiny_model, kind):
    e = load_engine(tiny_model, engine=kind, block_size=4, swap_blocks=5)  # 20 token slots of swap
    assert e.info()["swap_blocks"] == 5 and e.stats()["swap_total"] == 5
    e.add(1, e.encode("abcdefgh"), {**GREEDY, "max_new_tokens": 30})  # 8 + 4 computed: 3 blocks
    e.add(2, e.encode("ijklmnop"), {**GREEDY, "max_new_tokens": 30})
    step_until_tokens(e, 2, 5)
    first = e.preempt(1, "swap")
    assert first.preempted == "swap" and e.stats()["swap_used"] == 3
    second = e.preempt(2, "swap")  # 3 more blocks do not fit the 2 left
    assert (second.preempted, second.recomputed) == ("recompute", e.seqs[2].tokens.__len__() - 1)
    assert e.stats()["swap_used"] == 3 and e.pool.usage().used == 0
    again = e.preempt(1, "swap")  # already out of the pool: nothing to do, and no second count
    assert again.preempted == "none" and e.swaps_out == 1
    for pid in (1, 2):
        e.abort(pid)


@pytest.mark.parametrize("kind", KINDS)
def test_abort_frees_pool_and_swap_blocks(engines, kind):
    e = engines[kind]
    e.add(1, e.encode("swapped out"), {**GREEDY, "max_new_tokens": 40})
    e.add(2, e.encode("still running"), {**GREEDY, "max_new_tokens": 40})
    streamed = "".join(ev.text for ev in step_until_tokens(e, 1, 4) if ev.pid == 1)
    e.preempt(1, "swap")
    assert e.swap_used > 0 and e.pool.usage().used > 0
    parked = e.abort(1)
    assert parked.finish_reason == "killed" and streamed + parked.text == parked.final_text
    assert e.swap_used == 0
    e.abort(2)
    assert e.pool.usage().used == 0 and not e.seqs and e.abort(1) is None


@pytest.mark.parametrize("kind", KINDS)
def test_memory_pressure_preempts_and_reports_an_event_instead_of_resuming_silently(tiny_model, kind):
    e = load_engine(tiny_model, engine=kind, block_size=4, num_blocks=11)  # 10 blocks: 40 slots for 2 x 32
    ref = {}
    for pid, text in ((1, "first one"), (2, "second one")):
        ref[pid] = uninterrupted(e, e.encode(text), GREEDY, 23)
    e.add(1, e.encode("first one"), {**GREEDY, "max_new_tokens": 23})
    e.add(2, e.encode("second one"), {**GREEDY, "max_new_tokens": 23}, priority=5)  # ranks last
    events = drain(e)  # until nothing is active: 1 finished, 2 parked by the engine, never resumed by it
    preempted = [ev for ev in events if ev.preempted]
    assert [(ev.pid, ev.preempted) for ev in preempted] == [(2, "swap")]
    assert 2 in e.seqs and e.seqs[2].parked and not e.has_work() and e.stats()["parked"] == 1
    assert e.step() == [] and e.step() == []  # it stays parked: no spinning, no silent resume
    assert tokens(events, 1) == ref[1]
    e.resume(2, 5)
    events += drain(e)
    assert tokens(events, 2) == ref[2] and not e.seqs  # swapped back in: the uninterrupted output


@pytest.mark.parametrize("kind", KINDS)
def test_an_idle_session_gives_way_before_a_running_sequence(tiny_model, kind):
    e = load_engine(tiny_model, engine=kind, block_size=4, num_blocks=9)  # 8 blocks: 32 slots
    e.add(1, e.encode("session"), {**GREEDY, "max_new_tokens": 4}, priority=-5, session=True)
    turn = drain(e)
    assert turn[-1].finish_reason == "length" and e.seqs[1].parked and e.pool.tables[1]  # KV kept, parked
    e.add(2, e.encode("batch job"), {**GREEDY, "max_new_tokens": 20}, priority=10)  # 29 tokens: needs 8 blocks
    events = drain(e)
    assert [(ev.pid, ev.preempted) for ev in events if ev.preempted] == [(1, "swap")]  # not the running one
    assert events[-1].pid == 2 and events[-1].finish_reason == "length"
    assert e.seqs[1].swap is not None and not e.pool.tables.get(1)
    e.abort(1)
    assert e.swap_used == 0


@pytest.mark.parametrize("idle", ["pool", "swap", "recompute"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_session_turn_keeps_the_common_prefix_and_prefills_only_the_new_tokens(engines, kind, idle):
    e = engines[kind]
    first = e.encode(messages=[{"role": "user", "content": "hi"}])
    e.add(1, first, {**GREEDY, "max_new_tokens": 6}, session=True)
    turn1 = drain(e)
    assert turn1[-1].finish_reason == "length" and e.seqs[1].parked and sum(ev.prefilled for ev in turn1) == len(first)
    reply = tokens(turn1, 1)
    if idle != "pool":
        e.preempt(1, idle)  # the session's KV leaves the pool while it waits for its user
    # the next turn renders the reply a little differently (its last two tokens): the common prefix is kept
    user = e.encode("<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n")
    context = first + reply[:-2] + user
    kept = {"recompute": 0}.get(idle, len(first) + len(reply) - 2)
    e.append(1, context, {**GREEDY, "max_new_tokens": 6})
    assert e.seqs[1].parked and e.seqs[1].computed == kept and not e.has_work()  # parked until resumed
    e.resume(1, 0)
    turn2 = drain(e)
    assert sum(ev.prefilled for ev in turn2) == len(context) - kept  # only the new tokens (all after a recompute)
    assert turn2[-1].finish_reason == "length" and e.seqs[1].parked
    e.add(2, context, {**GREEDY, "max_new_tokens": 6})
    fresh = drain(e)
    assert tokens(turn2, 1) == tokens(fresh, 2) and turn2[-1].final_text == fresh[-1].final_text
    assert e.abort(1).final_text == turn2[-1].final_text  # the turn's text
    assert e.swap_used == 0


def test_a_session_turn_after_the_whole_reply_prefills_the_new_tokens_and_the_unfed_last_reply_token(engines):
    e = engines["paged"]
    first = e.encode("abc")
    e.add(1, first, {**GREEDY, "max_new_tokens": 3}, session=True)
    reply = tokens(drain(e), 1)
    new = e.encode("def")
    e.append(1, first + reply + new)
    e.resume(1)
    turn2 = drain(e)
    # the reply's last token was sampled but never fed through the model: it is new to the KV
    assert turn2[0].prefilled == len(new) + 1 and sum(ev.prefilled for ev in turn2) == len(new) + 1
    e.abort(1)


def test_append_refuses_a_running_sequence_and_ignores_an_unknown_pid(engines):
    from llmos.syscalls.errors import InvalidArgument

    e = engines["paged"]
    e.add(1, e.encode("x"), {**GREEDY, "max_new_tokens": 3})
    with pytest.raises(InvalidArgument, match="not a parked session"):
        e.append(1, [5, 6])
    e.append(12345, [5, 6])
    assert e.preempt(12345, "swap") is None and e.resume(12345) is None and e.renice(12345, 3) is None
    with pytest.raises(InvalidArgument, match="preemption mode"):
        e.preempt(1, "later")
    drain(e)


def test_without_max_batch_the_step_budget_and_the_pool_size_the_batch(tiny_model):
    e = load_engine(tiny_model, engine="paged", block_size=4, max_tokens_per_step=20)
    assert e.info()["max_batch"] == 20 and e.info()["max_tokens_per_step"] == 20
    for pid in range(1, 31):
        e.add(pid, [5 + pid], {**GREEDY, "max_new_tokens": 4})
    batches = []
    while e.has_work():
        e.step()
        batches.append(e.last_batch)
    assert max(batches) == 20  # more than the old fixed 16, up to one token each of the budget
    capped = load_engine(tiny_model, engine="paged", block_size=4, max_tokens_per_step=20, max_batch=6)
    for pid in range(1, 31):
        capped.add(pid, [5 + pid], {**GREEDY, "max_new_tokens": 4})
    batches = []
    while capped.has_work():
        capped.step()
        batches.append(capped.last_batch)
    assert max(batches) == 6 and capped.info()["max_batch"] == 6


@pytest.mark.parametrize("kind", KINDS)
def test_the_engine_reports_its_measured_switch_costs(engines, kind):
    info, stats = engines[kind].info(), engines[kind].stats()
    assert info["swap_bytes_per_s"] > 1e6 and info["prefill_tokens_per_s"] > 10
    assert info["swap_blocks"] == engines[kind].pool.capacity  # the default: the pool's capacity
    for key in ("swap_used", "swap_total", "swaps_out", "swaps_in", "recomputed_tokens", "prefill_tokens_per_s",
                "parked", "running"):
        assert key in stats
    assert stats["steps"] > 0 or kind  # the load-time probe leaves no count behind (checked below)
    fresh = load_engine(engines[kind].name, engine=kind)
    assert fresh.steps == 0 and not fresh.seqs and fresh.pool.usage().used == 0
