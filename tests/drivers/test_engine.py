"""Both engines on a tiny real Llama: HF-identical greedy output, stops, limits, chat, abort."""

import pytest
import torch

from llmos.drivers.model.engine import load_engine
from llmos.syscalls.errors import InvalidArgument, TooBig


@pytest.fixture(scope="module", params=["paged", "sequential"])
def engine(tiny_model, request):
    e = load_engine(tiny_model, engine=request.param, max_batch=8)
    assert e.kind == request.param
    return e


def run_all(engine):
    events = {}
    while engine.has_work():
        for ev in engine.step():
            events.setdefault(ev.pid, []).append(ev)
    return events


def test_greedy_output_is_token_for_token_what_hf_generate_gives(engine):
    prompts = ["hello world", "这是一个关于", "a"]
    for pid, p in enumerate(prompts, 1):
        engine.add(pid, engine.encode(p), {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True})
    events = run_all(engine)
    for pid, p in enumerate(prompts, 1):
        ids = torch.tensor([engine.encode(p)])
        ref = engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                    min_new_tokens=12, pad_token_id=engine.tokenizer.eos_token_id)
        ours = [t for ev in events[pid] for t in ev.token_ids]
        assert ours == ref[0, ids.shape[1]:].tolist()


def test_streamed_text_concatenates_to_the_final_text(engine):
    engine.add(1, engine.encode("abc"), {"max_new_tokens": 20, "seed": 3, "ignore_eos": True})
    evs = run_all(engine)[1]
    assert "".join(e.text for e in evs) == evs[-1].final_text
    assert evs[-1].finish_reason == "length" and sum(len(e.token_ids) for e in evs) == 20


def test_the_same_seed_gives_the_same_sample_and_another_seed_differs(engine):
    outs = []
    for pid, seed in enumerate([7, 7, 8], 1):
        engine.add(pid, engine.encode("xyz"), {"max_new_tokens": 16, "seed": seed, "temperature": 1.5,
                                               "ignore_eos": True})
    evs = run_all(engine)
    for pid in (1, 2, 3):
        outs.append([t for e in evs[pid] for t in e.token_ids])
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_a_stop_string_ends_the_output_before_the_match(engine):
    engine.add(1, engine.encode("q"), {"max_new_tokens": 30, "temperature": 0.0, "ignore_eos": True})
    full = run_all(engine)[1][-1].final_text
    assert len(full) > 6
    stop = full[3:5]
    engine.add(2, engine.encode("q"), {"max_new_tokens": 30, "temperature": 0.0, "ignore_eos": True,
                                       "stop": [stop]})
    evs = run_all(engine)[2]
    assert evs[-1].finish_reason == "stop"
    assert evs[-1].final_text == full[:full.index(stop)]
    assert "".join(e.text for e in evs) == evs[-1].final_text


def test_a_stop_token_id_ends_the_output(engine):
    engine.add(1, engine.encode("q"), {"max_new_tokens": 10, "temperature": 0.0, "ignore_eos": True})
    toks = [t for e in run_all(engine)[1] for t in e.token_ids]
    engine.add(2, engine.encode("q"), {"max_new_tokens": 10, "temperature": 0.0, "ignore_eos": True,
                                       "stop_token_ids": [toks[2]]})
    evs = run_all(engine)[2]
    assert evs[-1].finish_reason == "stop" and len(evs) == toks.index(toks[2]) + 1


def test_generation_stops_at_the_context_window(engine):
    ids = engine.encode("x" * (engine.context_len - 4))
    engine.add(1, ids, {"max_new_tokens": 100, "ignore_eos": True})
    evs = run_all(engine)[1]
    assert evs[-1].finish_reason == "length" and len(ids) + len(evs) == engine.context_len


def test_a_prompt_longer_than_the_context_is_e2big(engine):
    with pytest.raises(TooBig):
        engine.encode("x" * (engine.context_len + 5))


def test_chat_messages_use_the_models_template(engine):
    ids = engine.encode(messages=[{"role": "user", "content": "hi"}])
    text = engine.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nhi<|im_end|>") and text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("kw", [{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, {},
                                {"messages": []}, {"messages": [{"role": "user"}]}])
def test_bad_input_shapes_are_einval(engine, kw):
    with pytest.raises(InvalidArgument):
        engine.encode(**kw)


def test_an_empty_prompt_starts_from_bos(engine):
    assert engine.encode("") == [engine.tokenizer.bos_token_id]


def test_abort_keeps_what_was_generated(engine):
    engine.add(1, engine.encode("q"), {"max_new_tokens": 50, "ignore_eos": True, "seed": 1})
    streamed = "".join(engine.step()[0].text + engine.step()[0].text for _ in range(2))
    ev = engine.abort(1)
    assert ev.finish_reason == "killed" and streamed + ev.text == ev.final_text
    assert not engine.has_work() and engine.abort(1) is None


def test_info_describes_the_loaded_model(engine):
    info = engine.info()
    assert info["architecture"] == "LlamaForCausalLM" and info["context_len"] == 1024
    assert info["kv_blocks"] == engine.pool.capacity and info["kv_bytes_per_token"] == 2 * 2 * 32 * 4
    assert info["device"] == "cpu" and info["has_chat_template"]
