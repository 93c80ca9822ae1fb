"""LLM processes end to end: a real kernel subprocess, real ZeroMQ, a real tiny model."""

import pytest

from llmos import NoSuchProcess, TimedOut
from tests.conftest import wait_for

GREEDY = {"temperature": 0.0, "ignore_eos": True}
LONG = {"max_new_tokens": 100_000, **GREEDY}  # with long_model's context: running until killed


def test_spawn_and_wait_return_text_tokens_reason_and_timings(client, tiny_model):
    pid = client.spawn(prompt="hello", model=tiny_model, max_new_tokens=8, **GREEDY)
    r = client.wait(pid, timeout=60)
    assert r.pid == pid and r.finish_reason == "length" and len(r.token_ids) == 8
    assert r.stats.output_tokens == 8 and r.stats.prompt_tokens > 0
    assert r.stats.ttft_s > 0 and r.stats.tpot_s > 0 and r.stats.queue_time_s >= 0


def test_greedy_generation_is_deterministic_across_processes(client, tiny_model):
    a = client.wait(client.spawn(prompt="abc", model=tiny_model, max_new_tokens=10, **GREEDY))
    b = client.wait(client.spawn(prompt="abc", model=tiny_model, max_new_tokens=10, **GREEDY))
    assert a.token_ids == b.token_ids


def test_a_prompt_given_as_token_ids_generates_what_the_same_text_does(client, tiny_model):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model)("the quick brown fox")["input_ids"]
    greedy = dict(model=tiny_model, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    by_text = client.wait(client.spawn(prompt="the quick brown fox", **greedy))
    by_ids = client.wait(client.spawn(prompt_ids=ids, **greedy))
    assert by_ids.token_ids == by_text.token_ids and len(by_ids.token_ids) == 8
    assert by_ids.stats.prompt_tokens == len(ids)


def test_stream_yields_chunks_that_add_up_to_the_result(client, tiny_model):
    pid = client.spawn(prompt="stream me", model=tiny_model, max_new_tokens=20, seed=5, ignore_eos=True)
    stream = client.stream(pid)
    chunks = list(stream)
    assert stream.result is not None and "".join(chunks) == stream.result.text
    assert stream.token_ids == stream.result.token_ids and len(stream.token_ids) == 20
    assert client.wait(pid).text == stream.result.text


def test_chat_messages_spawn_a_process(client, tiny_model):
    pid = client.spawn(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                       model=tiny_model, max_new_tokens=4, **GREEDY)
    assert client.wait(pid).stats.output_tokens == 4


def test_ps_lists_processes_with_state_priority_and_model(client, long_model):
    pid = client.spawn(prompt="x", model=long_model, priority=7, **LONG)
    row = next(p for p in client.ps() if p.pid == pid)
    assert row.priority == 7 and row.model == long_model and row.state in ("READY", "RUNNING")
    client.kill(pid, "KILL")
    assert client.wait(pid).finish_reason == "killed"


def test_term_cancels_and_keeps_the_partial_output(client, long_model):
    pid = client.spawn(prompt="long", model=long_model, **LONG)
    wait_for(lambda: client.stat(pid).output_tokens >= 3, 30, "3 tokens")
    client.kill(pid, "TERM")
    r = client.wait(pid, timeout=30)
    assert r.finish_reason == "killed" and r.signal == "TERM" and len(r.token_ids) >= 3


def test_wait_with_a_timeout_raises_etimedout_and_the_process_lives_on(client, long_model):
    pid = client.spawn(prompt="x", model=long_model, **LONG)
    with pytest.raises(TimedOut):
        client.wait(pid, timeout=0.2)
    assert client.stat(pid).state in ("READY", "RUNNING")
    client.kill(pid, "KILL")
    client.wait(pid)


def test_a_reaped_process_is_gone_and_an_unreaped_zombie_stays(client, tiny_model):
    pid = client.spawn(prompt="x", model=tiny_model, max_new_tokens=2, **GREEDY)
    assert client.wait(pid, reap=False).finish_reason == "length"
    assert client.stat(pid).state == "ZOMBIE"
    client.wait(pid)
    with pytest.raises(NoSuchProcess):
        client.stat(pid)


def test_several_processes_on_one_model_make_progress_together(client, long_model):
    pids = [client.spawn(prompt=f"p{i}", model=long_model, **LONG) for i in range(3)]
    stats = wait_for(lambda: (lambda st: st if all(s.output_tokens >= 5 for s in st) else None)(
        [client.stat(p) for p in pids]), 30, "5 tokens from each")
    assert all(s.state == "RUNNING" for s in stats)
    for p in pids:
        client.kill(p, "KILL")
        client.wait(p)


def test_an_urgent_process_preempts_a_full_batch_and_a_worse_one_waits(client, long_model):
    # the shared kernel runs at most 4 processes per model at once: the blockers fill the batch
    blockers = [client.spawn(prompt="b", model=long_model, **LONG) for _ in range(4)]
    wait_for(lambda: all(client.stat(b).state == "RUNNING" for b in blockers), 10, "the batch to fill")
    low = client.spawn(prompt="low", model=long_model, max_new_tokens=3, priority=15, **GREEDY)
    high = client.spawn(prompt="high", model=long_model, max_new_tokens=3, priority=-15, **GREEDY)
    assert client.stat(low).state == "READY"  # worse than the batch: it waits
    r_high = client.wait(high, timeout=30)  # no wait for a blocker to end: it took the place of one
    assert r_high.finish_reason == "length" and len(r_high.token_ids) == 3
    preempted = [b for b in blockers if client.stat(b).preemptions]
    assert len(preempted) >= 1
    for b in blockers:
        client.kill(b, "KILL")
    assert client.wait(low, timeout=30).finish_reason == "length"
    for b in blockers:
        client.wait(b)
