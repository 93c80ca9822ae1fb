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
    assert evs[-1].finish_reason == "length" and len(ids) + sum(len(e.token_ids) for e in evs) == engine.context_len
    assert sum(e.prefilled for e in evs) == len(ids)  # a prompt of 1020 tokens, prefilled over two steps


def test_a_prompt_longer_than_the_context_is_e2big(engine):
    with pytest.raises(TooBig):
        engine.encode("x" * (engine.context_len + 5))


class RecordingTokenizer:
    """The engine's tokenizer, recording the length of every text it is asked to tokenise."""

    def __init__(self, inner):
        self.inner, self.lengths = inner, []

    def __call__(self, text, **kw):
        self.lengths.append(len(text))
        return self.inner(text, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_text_that_cannot_fit_is_refused_after_tokenising_a_prefix_and_one_that_fits_is_tokenised_whole(
        engine, monkeypatch):
    tok = RecordingTokenizer(engine.tokenizer)
    monkeypatch.setattr(engine, "tokenizer", tok)
    assert engine.max_prompt_chars == 12 * 1024  # under the character bound...
    with pytest.raises(TooBig, match=r"prompt cannot fit: its first 4096 of 12000 characters are already 4096 "
                                     r"tokens; the model's context holds 1024"):
        engine.encode("ab " * 4000)  # ... but one token per character
    assert tok.lengths == [4096]  # the rest was never tokenised
    fits = "<|im_start|>" * 1000  # 12000 characters, 1000 tokens: the prefix is no proof, the whole is tokenised
    tok.lengths.clear()
    assert engine.encode(fits) == tok.inner(fits)["input_ids"] and tok.lengths[-2:] == [4096, 12000]
    messages = [{"role": "user", "content": "ab " * 1800}] * 2  # 10808 characters in all
    with pytest.raises(TooBig, match=r"the rendered chat template cannot fit: its first 4096 of 108\d\d characters"):
        engine.encode(messages=messages)


def test_a_chat_template_that_renders_more_than_the_character_bound_is_refused_before_tokenising(
        engine, monkeypatch):
    tok = RecordingTokenizer(engine.tokenizer)
    monkeypatch.setattr(engine, "tokenizer", tok)
    monkeypatch.setattr(tok.inner, "chat_template", "{% for m in messages %}{{ m['content'] * 100 }}{% endfor %}")
    with pytest.raises(TooBig, match=r"the chat template renders the messages as 20000 characters; .* at most 12288"):
        engine.encode(messages=[{"role": "user", "content": "x" * 200}])
    assert tok.lengths == []


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


# -- text: stop strings that are special tokens, and the output decoded after the prompt --------------------

def run_one(engine, prompt_ids, **params):
    engine.add(1, prompt_ids, {"temperature": 0.0, "max_new_tokens": 10, **params})
    events = run_all(engine)[1]
    assert "".join(e.text for e in events) == events[-1].final_text
    return events[-1], [t for e in events for t in e.token_ids]


@pytest.fixture(scope="module")
def special_chain(tmp_path_factory):
    """The default tokenizer; " value" -> <|im_end|> -> "\\n" -> <|im_start|> -> "user" -> <|endoftext|> -> " of"."""
    from transformers import AutoTokenizer

    from llmos.drivers.model.registry import DEFAULT_MODEL_DIR
    from tests.tinymodel import make_chain_llama

    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    chain = {266: 516, 516: 2, 2: 201, 201: 1, 1: 2193, 2193: 0, 0: 299, 299: 266}
    return load_engine(make_chain_llama(tmp_path_factory.mktemp("chain") / "special", tok, chain))


def test_a_stop_string_that_is_a_special_tokens_text_stops_there_as_its_token_id_does(special_chain):
    e = special_chain
    prompt = e.encode("Return the")
    for special in ("<|im_end|>", "<|im_start|>", "<|endoftext|>"):
        tid = e.tokenizer.convert_tokens_to_ids(special)
        by_id, ids_by_id = run_one(e, prompt, ignore_eos=True, stop_token_ids=[tid])
        by_text, ids_by_text = run_one(e, prompt, ignore_eos=True, stop=["never", special])
        assert by_text.finish_reason == by_id.finish_reason == "stop" and ids_by_text[-1] == tid
        assert (by_text.final_text, ids_by_text) == (by_id.final_text, ids_by_id)
        assert special not in by_text.final_text and by_text.final_text.startswith(" value")
    assert run_one(e, prompt, ignore_eos=True, stop=["<|im_end|>"])[0].final_text == " value"


@pytest.fixture(scope="module")
def spm_chain(tmp_path_factory):
    from tests.tinymodel import make_chain_llama, metaspace_tokenizer

    tok = metaspace_tokenizer()
    ids = tok("The model runs the kernel")["input_ids"]  # <s> ▁The ▁model ▁runs ▁the ▁kernel
    chain = {a: b for a, b in zip(ids[2:], ids[3:])} | {ids[-1]: tok.eos_token_id}
    return load_engine(make_chain_llama(tmp_path_factory.mktemp("chain") / "spm", tok, chain))


def test_the_first_generated_word_keeps_its_leading_space_with_a_sentencepiece_decoder(spm_chain):
    prompt = spm_chain.encode("The model")
    last, ids = run_one(spm_chain, prompt)
    whole = spm_chain.tokenizer.decode(prompt + ids, skip_special_tokens=True)
    assert last.final_text == " runs the kernel" and "The model" + last.final_text == whole


def test_a_prompt_ending_inside_a_character_completed_by_the_output_streams_that_character(tiny_model,
                                                                                          tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.tinymodel import make_chain_llama

    tok = AutoTokenizer.from_pretrained(tiny_model)  # one token per byte
    raw = tok.encode("the中 value", add_special_tokens=False)
    chain = {a: b for a, b in zip(raw[3:], raw[4:])} | {raw[-1]: tok.eos_token_id}
    e = load_engine(make_chain_llama(tmp_path_factory.mktemp("chain") / "utf8", tok, chain))
    last, ids = run_one(e, raw[:4])  # "the" and the first byte of 中
    assert ids[:-1] == raw[4:] and last.final_text == "中 value"


# -- one memory contract for every engine, and the order sequences run in -----------------------------------

def hf_greedy(engine, ids, n):
    t = torch.tensor([ids])
    out = engine.model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=engine.tokenizer.eos_token_id)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("kind", ["paged", "sequential"])
def test_a_sequence_that_outgrows_what_the_pool_can_ever_give_ends_with_enomem_on_every_engine(tiny_model, kind):
    e = load_engine(tiny_model, engine=kind, block_size=8, num_blocks=3)  # 2 blocks: 16 token slots
    prompt = e.encode("Return the")
    e.add(1, prompt, {"max_new_tokens": 20, "ignore_eos": True, "seed": 1})
    events = []
    for _ in range(40):
        events += e.step()
        if not e.has_work():
            break
    last = events[-1]
    assert last.finish_reason == "error" and last.error["error"] == "ENOMEM"
    # it ran until all 16 slots held keys and values; the token sampled from the last one is kept too
    assert len(prompt) + sum(len(ev.token_ids) for ev in events) == 17
    assert e.pool.usage().used == 0 and not e.has_work()


@pytest.mark.parametrize("kind", ["paged", "sequential"])
def test_under_memory_pressure_every_engine_preempts_the_lowest_priority_then_the_newest(tiny_model, kind):
    e = load_engine(tiny_model, engine=kind, block_size=4, num_blocks=10)  # 9 blocks; 3 x 24 tokens need 18
    prompts = {1: e.encode("aaa"), 2: e.encode("bbb"), 3: e.encode("ccc")}
    for pid, priority in ((1, 0), (2, 5), (3, 0)):  # 2 ranks last (priority 5); 3 is newer than 1
        e.add(pid, prompts[pid], {"max_new_tokens": 20, **{"temperature": 0.0, "ignore_eos": True}},
              priority=priority)
    seqs = dict(e.seqs)
    victims, toks = [], {}
    while e.has_work():
        before = {pid: s.preemptions for pid, s in seqs.items()}
        for ev in e.step():
            toks.setdefault(ev.pid, []).extend(ev.token_ids)
            if ev.preempted:  # the engine reports it and waits: the kernel's resume brings it back
                assert e.seqs[ev.pid].parked and not e.has_work() or ev.pid not in [s.pid for s in e.active()]
                e.resume(ev.pid)
        victims += [pid for pid, s in seqs.items() if s.preemptions > before[pid]]
        assert e.steps < 500
    assert victims[:2] == [2, 3] and 1 not in victims
    for pid, ids in prompts.items():
        assert toks[pid] == hf_greedy(e, ids, 20), pid  # swapped or recomputed after preemption: the same output
    assert e.pool.usage().used == 0


def test_the_paged_engine_runs_better_priorities_first_then_earlier_arrivals(tiny_model):
    e = load_engine(tiny_model, engine="paged", max_tokens_per_step=4, block_size=4)
    for pid, priority in ((1, 3), (2, -2), (3, 3), (4, -2)):
        e.add(pid, e.encode("wxyz"), {"max_new_tokens": 3, "temperature": 0.0, "ignore_eos": True},
              priority=priority)
    first_token = []
    while e.has_work():
        first_token += [ev.pid for ev in e.step() if ev.token_ids and ev.pid not in first_token]
    assert first_token == [2, 4, 1, 3]


def test_a_sequence_resumed_with_its_output_so_far_continues_token_for_token(engine):
    params = {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}
    prompt = engine.encode("resume me")
    engine.add(1, prompt, params)
    whole = run_all(engine)[1]
    tokens = [t for e in whole for t in e.token_ids]
    assert len(tokens) == 16
    for cut in (1, 7, 15):
        engine.add(2, prompt, params, output_ids=tokens[:cut])
        rest = run_all(engine)[2]
        assert tokens[:cut] + [t for e in rest for t in e.token_ids] == tokens
        assert rest[-1].finish_reason == "length" and rest[-1].final_text == whole[-1].final_text


def test_a_sequence_resumed_with_output_that_already_ends_it_finishes_at_once(engine):
    params = {"max_new_tokens": 5, "temperature": 0.0, "ignore_eos": True}
    prompt = engine.encode("done already")
    engine.add(1, prompt, params)
    whole = run_all(engine)[1]
    tokens = [t for e in whole for t in e.token_ids]
    engine.add(2, prompt, params, output_ids=tokens)
    rest = run_all(engine)[2]
    assert [t for e in rest for t in e.token_ids] == [] and rest[-1].finish_reason == "length"
    assert rest[-1].final_text == whole[-1].final_text and 2 not in engine.seqs
