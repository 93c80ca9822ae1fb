"""Prefix caching (issue 13): KV blocks of identical token prefixes shared between sequences through the pool's hash
index, reference-counted, copy-on-write, evicted least-recently-used. Tiny real model; the pool's invariant checker
(``KVBlockPool.check``) runs after every step, and every path ends with every block back."""

import random

import pytest
import torch

from llmos.drivers.memory import KVBlockPool, chain_hashes
from llmos.drivers.model.engine import load_engine
from tests.drivers.test_paged import GREEDY, hf_greedy

BS = 4
SYSTEM = "you are a terse assistant. answer in one line. "  # 47 tokens (the byte-level BPE): 11 full blocks of 4
FULL = 11


def engine(model_dir, **kw):
    """A paged engine on the tiny model, blocks of 4 tokens, a small pool (the checker walks it every step)."""
    return load_engine(model_dir, engine="paged", measure=False, block_size=BS, **{"num_blocks": 160, **kw})


def check(e):
    """The pool's invariants, and the engine's: a block another table or the index holds lies wholly below the
    computed tokens of every sequence holding it (nothing will ever write into it)."""
    e.pool.check()
    for seq in e.seqs.values():
        for i, b in enumerate(e.pool.tables.get(seq.pid, ())):
            if e.pool.shared(b):
                assert (i + 1) * BS <= seq.computed, (seq.pid, i, seq.computed)


def run(e, resume=True, max_steps=5000):
    toks = {}
    for _ in range(max_steps):
        if not e.has_work():
            break
        for ev in e.step():
            toks.setdefault(ev.pid, []).extend(ev.token_ids)
            if ev.preempted and resume:
                e.resume(ev.pid)
        check(e)
    return toks


def all_back(e):
    u = e.pool.usage()
    assert u.used == 0 and u.free == u.total and u.per_user == {} and u.per_process == {}
    e.pool.check()


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model


# -- the pool -----------------------------------------------------------------------------------------
def test_the_pool_shares_blocks_by_reference_and_keeps_released_ones_cached_until_evicted_lru():
    pool = KVBlockPool(num_blocks=7, block_size=2)  # 6 usable blocks
    tokens = [5, 6, 7, 8, 9, 10]
    keys = chain_hashes(tokens, 2, [])
    assert len(keys) == 3 and chain_hashes(tokens[:4], 2, []) == keys[:2]  # a key names the prefix
    assert chain_hashes([5, 6, 7, 9, 9, 10], 2, [])[2] != keys[2]  # ... all of it: block 2 alike, block 1 not
    a = pool.allocate(1, 3, "ann")
    assert [pool.register(1, i, k) for i, k in enumerate(keys)] == [True] * 3
    assert pool.lookup(keys) == a and pool.attach(2, pool.lookup(keys[:2]), "bob") == 2
    pool.check()
    u = pool.usage()
    assert (u.used, u.free, u.per_user, u.per_process) == (3, 3, {"ann": 3, "bob": 2}, {1: 3, 2: 2})
    assert pool.free(1) == 3 and pool.usage().used == 2 and pool.usage().cached == 1  # a[2]: cached, not free
    assert pool.free(2) == 2 and pool.usage().used == 0 and pool.free_blocks == 6  # cached counts as free
    assert pool.cached_blocks == 3 and pool.can_allocate(6)
    pool.allocate(3, 4)  # 3 never-cached blocks, then the least recently used cached one: the tail, a[2]
    assert pool.evictions == 1 and pool.lookup(keys) == a[:2] and a[2] in pool.tables[3]
    pool.check()
    pool.allocate(4, 2)
    assert pool.evictions == 3 and pool.lookup(keys) == [] and pool.cached_blocks == 0
    pool.free(3)
    pool.free(4)
    pool.check()


def test_a_key_already_indexed_leaves_a_second_block_private_and_copy_on_write_replaces_shared_blocks():
    pool = KVBlockPool(num_blocks=6, block_size=2)
    keys = chain_hashes([1, 2, 3, 4], 2, [])
    pool.allocate(1, 2)
    pool.allocate(2, 2)
    assert pool.register(1, 0, keys[0]) and not pool.register(2, 0, keys[0])  # computed twice: 2's stays private
    assert pool.make_private(2, 0) is None  # private already: written in place
    pool.attach(3, pool.lookup(keys))
    old, new = pool.make_private(3, 0)  # indexed and held by 1: 3 gets a copy
    assert old == pool.tables[1][0] and pool.tables[3] == [new] and not pool.shared(new)
    pool.free(1)
    assert pool.make_private(3, 0) is None and pool.usage().cached == 1  # 1's block: cached, in no table
    pool.free(2)
    pool.free(3)
    pool.reset(6)  # a reset (the dynamic pool shrinking) drops the index: the slots go
    assert pool.indexed_blocks == 0 and pool.free_blocks == 5
    pool.check()


def test_per_user_accounting_charges_each_holder_its_whole_table():
    pool = KVBlockPool(num_blocks=12, block_size=1, default_user_cap=4)
    keys = chain_hashes([1, 2, 3], 1, [])
    pool.allocate(1, 3, "ann")
    for i, k in enumerate(keys):
        pool.register(1, i, k)
    assert pool.attach(2, pool.lookup(keys), "ann") == 1  # ann holds 3: one more block under her cap of 4
    assert pool.attach(3, pool.lookup(keys), "bob") == 3 and pool.used_by("bob") == 3
    assert pool.usage().used == 3 and pool.used_by("ann") == 4
    pool.check()
    for pid in (1, 2, 3):
        pool.free(pid)
    pool.check()


# -- the engine ---------------------------------------------------------------------------------------------
def test_greedy_output_is_identical_with_the_cache_on_and_off_and_to_hf(model_dir):
    out = {}
    for on in (True, False):
        e = engine(model_dir, prefix_cache=on)
        ids = {pid: e.encode(SYSTEM + q) for pid, q in enumerate(["who?", "what is 2+2?", "why", "x" * 9], 1)}
        e.add(1, ids[1], {"max_new_tokens": 8, **GREEDY})
        out[on] = run(e)  # the first leaves the system prompt's blocks cached
        for pid in (2, 3, 4):
            e.add(pid, ids[pid], {"max_new_tokens": 8, **GREEDY})
        out[on].update(run(e))
        assert e.info()["prefix_cache"] is on
        s = e.stats()
        if on:
            assert s["prefix_hits"] == 3 and s["prefix_hit_tokens"] >= 3 * FULL * BS and s["prefix_cached_blocks"] > FULL
        else:
            assert (s["prefix_lookups"], s["prefix_hits"], s["prefix_cached_blocks"]) == (0, 0, 0)
        all_back(e)
    assert out[True] == out[False]
    for pid, x in ids.items():
        assert out[True][pid] == hf_greedy(e, x, 8), pid


def test_cached_tokens_are_not_counted_as_prefilled(model_dir):
    e = engine(model_dir)
    ids = e.encode(SYSTEM + "hello")
    e.add(1, ids, {"max_new_tokens": 2, **GREEDY})
    run(e)
    e.add(2, ids, {"max_new_tokens": 2, **GREEDY})  # the same prompt: all its full blocks but the last token's
    prefilled = 0
    while e.has_work():
        prefilled += sum(ev.prefilled for ev in e.step())
    hit = e.stats()["prefix_hit_tokens"]
    assert hit == (len(ids) - 1) // BS * BS and prefilled == len(ids) - hit  # one token at least is computed
    all_back(e)


@pytest.mark.parametrize("mode", ["swap", "recompute", "spill"])
def test_a_preempted_sharer_resumes_with_identical_output_and_every_block_comes_back(model_dir, tmp_path, mode):
    kw = {"swap_blocks": 0, "spill_dir": tmp_path / "spill" / "1", "spill_below_bytes": 1 << 62} if mode == "spill" else {}
    e = engine(model_dir, **kw)
    ids = {pid: e.encode(SYSTEM + q) for pid, q in ((1, "one"), (2, "two"), (3, "three"))}
    e.add(1, ids[1], {"max_new_tokens": 4, **GREEDY})
    run(e)
    toks = {}
    for pid in (2, 3):
        e.add(pid, ids[pid], {"max_new_tokens": 12, **GREEDY})
    for _ in range(4):  # both share the cached blocks and decode
        for ev in e.step():
            toks.setdefault(ev.pid, []).extend(ev.token_ids)
        check(e)
    shared = set(e.pool.tables[2]) & set(e.pool.tables[3])
    assert len(shared) >= FULL
    ev = e.preempt(2, "recompute" if mode == "recompute" else "swap")  # STOP is this preemption too
    assert ev.preempted == ("recompute" if mode == "recompute" else "swap") and not e.pool.tables.get(2)
    assert (mode == "spill") == bool(e.seqs[2].spilled)
    check(e)
    assert all(e.pool.shared(b) for b in shared)  # 3 and the index still hold them
    for ev in e.step():  # 3 goes on alone
        toks.setdefault(ev.pid, []).extend(ev.token_ids)
    e.resume(2)  # CONT
    for pid, t in run(e).items():
        toks.setdefault(pid, []).extend(t)
    for pid in (2, 3):
        assert toks[pid] == hf_greedy(e, ids[pid], 12), pid
    if mode == "recompute":
        assert e.stats()["prefix_hits"] == 3  # the recompute started from the cached blocks again
    all_back(e)
    e.close()


def test_memory_pressure_with_sharers_preempts_and_still_gives_identical_output(model_dir):
    e = engine(model_dir, num_blocks=30)  # 29 blocks: not enough for four private contexts of ~16 blocks
    ids = {pid: e.encode(SYSTEM + f"question {pid}") for pid in range(1, 5)}
    for pid, x in ids.items():
        e.add(pid, x, {"max_new_tokens": 14, **GREEDY})
    toks = run(e)
    for pid, x in ids.items():
        assert toks[pid] == hf_greedy(e, x, 14), pid
    all_back(e)


def test_killing_sharers_returns_every_block_and_keeps_the_prefix_cached(model_dir):
    e = engine(model_dir)
    for pid in range(1, 4):
        e.add(pid, e.encode(SYSTEM + str(pid)), {"max_new_tokens": 50, **GREEDY})
    e.step()
    e.step()  # 1 registered its blocks after the first step; 2 and 3 were prefilled beside it
    e.add(4, e.encode(SYSTEM + "4"), {"max_new_tokens": 50, **GREEDY})
    e.step()
    assert e.stats()["prefix_hits"] == 1 and e.pool.usage().used > 0
    for pid in range(1, 5):
        assert e.abort(pid).finish_reason == "killed"
    check(e)
    all_back(e)
    assert e.pool.cached_blocks >= FULL


def test_a_session_turn_that_keeps_part_of_a_shared_block_writes_into_a_private_copy(model_dir):
    e = engine(model_dir)
    first = e.encode(SYSTEM + "hi")  # 49 tokens
    e.add(1, first, {"max_new_tokens": 6, **GREEDY}, session=True)
    run(e)
    context = e.seqs[1].tokens  # 55: its first 54 computed, 13 full blocks cached
    ids2 = context + e.encode("more", add_special_tokens=False)
    e.add(2, ids2, {"max_new_tokens": 16, **GREEDY})
    first2 = [t for ev in e.step() if ev.pid == 2 for t in ev.token_ids]
    assert e.stats()["prefix_hit_tokens"] == 13 * BS
    k = 11 * BS + 2  # the next turn diverges inside block 11, which the index and pid 2 hold
    block = e.pool.tables[1][11]
    assert e.pool.tables[2][11] == block
    before = [(kc[block].clone(), vc[block].clone()) for kc, vc in zip(e.k_cache, e.v_cache)]
    turn = context[:k] + e.encode("bye", add_special_tokens=False)
    e.append(1, turn, {"max_new_tokens": 8, **GREEDY})
    assert e.stats()["prefix_cow_copies"] == 1 and e.pool.tables[1][11] != block and e.seqs[1].computed == k
    check(e)
    e.resume(1)
    toks = run(e)
    assert all(torch.equal(kc[block], k0) and torch.equal(vc[block], v0)
               for (kc, vc), (k0, v0) in zip(zip(e.k_cache, e.v_cache), before))  # the shared block never written
    assert toks[1] == hf_greedy(e, turn, 8)
    assert first2 + toks[2] == hf_greedy(e, ids2, 16)
    e.abort(1)
    all_back(e)



def test_a_process_resumed_from_the_journal_reuses_the_cached_prefix_of_its_prompt_and_output(model_dir):
    e = engine(model_dir)
    ids = e.encode(SYSTEM + "resumed")
    e.add(1, ids, {"max_new_tokens": 12, **GREEDY})
    ref = run(e)[1]
    e.add(2, ids, {"max_new_tokens": 12, **GREEDY}, output_ids=ref[:5])  # the kernel's journal had 5 tokens
    rest = run(e)[2]
    assert ref[:5] + rest == ref and e.stats()["prefix_hit_tokens"] == (len(ids) + 5 - 1) // BS * BS
    all_back(e)

def test_a_failed_step_returns_every_block(model_dir):
    e = engine(model_dir)
    ids = e.encode(SYSTEM + "fine")
    e.add(1, ids, {"max_new_tokens": 2, **GREEDY})
    run(e)
    e.add(2, ids[:-1] + [int(e.model.config.vocab_size) + 5], {"max_new_tokens": 4, **GREEDY})  # no such token
    e.add(3, ids, {"max_new_tokens": 4, **GREEDY})
    events = e.step()  # both hit the cache; the forward fails on 2's id, failing the step's sequences
    assert {ev.pid: ev.error["error"] for ev in events} == {2: "EIO", 3: "EIO"} and e.stats()["prefix_hits"] == 2
    all_back(e)
    e.add(4, ids, {"max_new_tokens": 4, **GREEDY})  # the cached blocks were not damaged
    assert run(e)[4] == hf_greedy(e, ids, 4)
    all_back(e)


def test_the_dynamic_pool_drops_the_index_when_it_shrinks(model_dir):
    e = engine(model_dir, kv_policy="dynamic", num_blocks=5, max_blocks=129)
    ids = {pid: e.encode(SYSTEM + f"dyn {pid}") for pid in (1, 2, 3)}
    e.add(1, ids[1], {"max_new_tokens": 10, **GREEDY})
    e.step()
    e.add(2, ids[2], {"max_new_tokens": 6, **GREEDY})  # shares 1's blocks while the pool is grown
    toks = run(e)
    assert e.stats()["prefix_hits"] == 1 and e.pool.num_blocks == 5 and e.pool.indexed_blocks == 0
    e.add(3, ids[3], {"max_new_tokens": 6, **GREEDY})
    toks.update(run(e))
    assert e.stats()["prefix_hits"] == 1  # nothing left to hit: the slots went with the shrink
    for pid, n in ((2, 6), (3, 6)):
        assert toks[pid] == hf_greedy(e, ids[pid], n)
    all_back(e)


def test_the_isolated_policy_shares_within_a_user_only_under_its_cap(model_dir):
    e = engine(model_dir, kv_policy="isolated", user_cap_blocks=30)
    ids = e.encode(SYSTEM + "iso")
    e.add(1, ids, {"max_new_tokens": 4, **GREEDY}, user="ann")
    run(e)
    e.add(2, ids, {"max_new_tokens": 8, **GREEDY}, user="ann")
    e.add(3, ids, {"max_new_tokens": 8, **GREEDY}, user="bob")
    e.add(4, ids, {"max_new_tokens": 8, **GREEDY}, user="ann")
    first = {ev.pid: ev.token_ids for ev in e.step()}
    # ann's two share her cached blocks (each charged its table); bob computes his own: another user's prompt
    # never reaches him, not even as a faster first token
    assert e.stats()["prefix_hits"] == 2 and not set(e.pool.tables[3]) & set(e.pool.tables[2])
    assert e.pool.used_by("ann") == len(e.pool.tables[2]) + len(e.pool.tables[4]) <= 30
    toks = {pid: first[pid] + t for pid, t in run(e).items()}
    assert e.pool.used_by("ann") == 0 and toks[2] == toks[3] == toks[4] == hf_greedy(e, ids, 8)
    all_back(e)


def test_a_capturing_sequence_reuses_only_positions_it_already_captured(model_dir):
    e = engine(model_dir)
    ids = e.encode(SYSTEM + "cap")
    e.add(1, ids, {"max_new_tokens": 2, **GREEDY})
    run(e)
    spec = {"kinds": ["hidden_states"], "layers": None, "heads": None, "max_bytes": 1 << 30, "key": 5,
            "limit_doc": "the test's limit"}
    e.add(2, ids, {"max_new_tokens": 10, **GREEDY, "capture": spec})
    e.step()
    assert e.stats()["prefix_hits"] == 0 and e.stats()["prefix_lookups"] == 2  # nothing captured yet: no reuse
    e.step()
    e.preempt(2, "recompute")
    e.resume(2)
    run(e)
    assert e.stats()["prefix_hits"] == 1  # recomputed: its captured positions came from the cache
    [(pid, cap)] = e.captured
    assert pid == 2 and cap.tokens == len(ids) + 10 - 1 and not cap.warnings
    all_back(e)


def test_random_operations_keep_every_count_exact(model_dir, tmp_path):
    """A seeded random mix of arrivals (three shared prefixes), steps, preemptions of both modes, resumes,
    kills and session turns, in a pool small enough to evict: the invariants after every operation, and
    every block back at the end."""
    rng = random.Random(13)
    e = engine(model_dir, num_blocks=48, swap_blocks=12, spill_dir=tmp_path / "spill" / "1",
               max_tokens_per_step=24)  # prompts prefilled in chunks, blocks registered as chunks fill them
    prefixes = [e.encode(p * 3) for p in ("alpha beta ", "gamma ", "delta epsilon zeta ")]
    pid = 0
    for _ in range(130):
        op = rng.random()
        live = list(e.seqs)
        if op < 0.25 or not live:
            pid += 1
            tail = [rng.randrange(3, 250) for _ in range(rng.randrange(1, 9))]
            e.add(pid, rng.choice(prefixes) + tail, {"max_new_tokens": rng.randrange(1, 12), **GREEDY},
                  user=rng.choice(["ann", "bob"]), session=rng.random() < 0.3)
        elif op < 0.7:
            for ev in e.step():
                if ev.preempted and rng.random() < 0.7:
                    e.resume(ev.pid)
        elif op < 0.8:
            e.preempt(rng.choice(live), rng.choice(["swap", "recompute"]))
        elif op < 0.88:
            e.resume(rng.choice(live))
        elif op < 0.94:
            e.abort(rng.choice(live))
        else:
            seq = e.seqs[rng.choice(live)]
            if seq.session and seq.parked:
                cut = rng.randrange(1, len(seq.tokens))
                e.append(seq.pid, seq.tokens[:cut] + [rng.randrange(3, 250) for _ in range(3)])
        check(e)
    s = e.stats()
    assert s["prefix_hits"] > 5 and s["prefix_evictions"] > 0 and s["preemptions"] > 0
    for p in list(e.seqs):
        e.abort(p)
    all_back(e)
    assert e.swap_used == 0
    e.close()


def test_the_sequential_engine_reports_no_prefix_cache(model_dir):
    e = load_engine(model_dir, engine="sequential", measure=False)
    assert e.info()["prefix_cache"] is False


def test_a_prompt_that_hits_but_must_wait_for_memory_holds_no_blocks_meanwhile(model_dir):
    e = engine(model_dir, num_blocks=21)  # 20 usable blocks
    e.add(1, e.encode(SYSTEM + "one"), {"max_new_tokens": 2, **GREEDY})
    run(e)  # 12 of its blocks stay cached
    e.add(2, e.encode("z" * 55), {"max_new_tokens": 4, **GREEDY})
    e.step()  # 14 blocks: every never-cached one, then the cache's least recently used (its tail)
    assert 0 < e.pool.usage().cached < FULL
    e.add(3, e.encode(SYSTEM + "two"), {"max_new_tokens": 2, **GREEDY})
    e.step()  # 3 finds the head of its prefix cached, but not the room for the rest: it waits
    assert 3 not in e.pool.tables and e.seqs[3].computed == 0 and e.stats()["prefix_hits"] == 0
    check(e)
    toks = run(e)
    assert toks[3] == hf_greedy(e, e.encode(SYSTEM + "two"), 2)
    all_back(e)


def test_through_the_kernel_a_second_process_prefills_only_what_follows_the_common_prefix(client, tiny_model):
    prefix = "a system prompt every process of this test shares, word for word, to be prefilled once. " * 2
    before = client.model_info(tiny_model)["executors"][0]
    first = client.wait(client.spawn(prompt=prefix + "first?", model=tiny_model, max_new_tokens=3,
                                     temperature=0.0), timeout=120)
    second = client.wait(client.spawn(prompt=prefix + "and the second?", model=tiny_model, max_new_tokens=3,
                                      temperature=0.0), timeout=120)
    assert first.finish_reason == second.finish_reason == "length"
    assert first.sched["prefill_tokens"] >= first.stats.prompt_tokens - 1  # nothing cached before it
    # the kernel's blocks are 8 tokens: all the full blocks of the shared prefix come from the cache
    assert second.sched["prefill_tokens"] <= second.stats.prompt_tokens - (len(prefix) // 2) // 8 * 8
    after = client.model_info(tiny_model)["executors"][0]  # other tests may share the kernel meanwhile: at least
    assert after["prefix_hits"] >= before["prefix_hits"] + 1
    assert after["prefix_hit_tokens"] >= before["prefix_hit_tokens"] + (len(prefix) // 2) // 8 * 8
