"""Captured intermediates in the engines: shapes, rows that are softmax distributions over 0..t, values that match
transformers' own (eager attention, output_hidden_states), greedy output the same with and without capture, the
byte limit, and the frames the worker sends."""

import io

import numpy as np
import pytest
import torch

from llmos.drivers.model.capture import FRAME_BYTES
from llmos.drivers.model.capture_spec import CaptureSpec, file_bytes, resolve
from llmos.drivers.model.engine import load_engine
from llmos.drivers.model.protocol import CaptureDone, Captured, from_wire
from llmos.syscalls import codec
from llmos.syscalls.errors import InvalidArgument
from tests.tinymodel import make_tiny_gpt2, make_tiny_llama

GREEDY = {"temperature": 0.0, "ignore_eos": True}
BOTH = ["attentions", "hidden_states"]


def spec(kinds=BOTH, layers=None, heads=None, max_bytes=1 << 30, key=5):
    return {"kinds": list(kinds), "layers": layers, "heads": heads, "max_bytes": max_bytes, "key": key,
            "limit_doc": "the test's limit"}


def run(engine, max_steps=10_000, on_step=None):
    """Step until nothing is active (a preempted sequence is resumed); token ids per pid."""
    toks = {}
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for ev in engine.step():
            toks.setdefault(ev.pid, []).extend(ev.token_ids)
            if ev.preempted:
                engine.resume(ev.pid)
        if on_step:
            on_step(engine)
    return toks


def files_of(engine, frame_bytes=FRAME_BYTES):
    """{pid: ({(kind, layer): np.ndarray}, CaptureDone)} from the captures the engine handed over, through the
    frames the worker would send (encoded and decoded as on the wire)."""
    out = {}
    for pid, cap in engine.captured:
        files, done = {}, None
        for msg in cap.frames(pid, frame_bytes):
            msg = from_wire(codec.decode(codec.encode(msg.to_wire())))
            if isinstance(msg, CaptureDone):
                done = msg
                continue
            buf = files.setdefault((msg.kind, msg.layer), bytearray())
            assert msg.start == len(buf) and len(msg.data) <= frame_bytes
            buf += msg.data
        out[pid] = ({k: np.load(io.BytesIO(bytes(v)), allow_pickle=False) for k, v in files.items()}, done)
    engine.captured.clear()
    return out


def reference(path, ids):
    """transformers' eager attentions [layer] -> [T, heads, T] and hidden states [layer] -> [T, hidden]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    return ([a[0].transpose(0, 1).numpy() for a in out.attentions] if out.attentions else [],
            [h[0].numpy() for h in out.hidden_states])


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory):
    """A tiny Llama with grouped-query attention (4 query heads over 2 key/value heads)."""
    return str(make_tiny_llama(tmp_path_factory.mktemp("models") / "gqa", kv_heads=2, seed=3))


@pytest.fixture(scope="module")
def gpt2_model(tmp_path_factory):
    return str(make_tiny_gpt2(tmp_path_factory.mktemp("models") / "gpt2"))


@pytest.mark.parametrize("which", ["mha", "gqa"])
def test_paged_captures_match_transformers_eager_attention_and_hidden_states(tiny_model, gqa_model, which):
    path = tiny_model if which == "mha" else gqa_model
    # a 7-token budget: the prompt is prefilled in chunks beside two other sequences that capture nothing
    e = load_engine(path, engine="paged", max_tokens_per_step=7, block_size=4, measure=False)
    ids = e.encode("the quick brown fox jumps")
    e.add(1, e.encode("another one"), {"max_new_tokens": 12, **GREEDY})
    e.add(2, ids, {"max_new_tokens": 9, **GREEDY, "capture": spec(heads=[3, 0])})
    e.add(3, e.encode("x" * 9), {"max_new_tokens": 5, **GREEDY})
    toks = run(e)
    (files, done), = files_of(e).values()
    t = len(ids) + len(toks[2]) - 1  # the last generated token is never fed back
    attn_ref, hidden_ref = reference(path, ids + toks[2][:-1])
    assert done.tokens == t and done.files == 5 and done.heads == [3, 0] and done.warnings == []
    assert sorted(files) == [("attentions", 0), ("attentions", 1), ("hidden_states", 0), ("hidden_states", 1),
                             ("hidden_states", 2)]
    for layer in (0, 1):
        a = files[("attentions", layer)]
        assert a.shape == (t, 2, t) and a.dtype == np.float32
        assert np.allclose(a.sum(-1), 1.0, atol=1e-5)
        assert not np.triu(a.transpose(1, 0, 2), k=1).any()  # nothing past position t
        np.testing.assert_allclose(a, attn_ref[layer][:, [3, 0]], atol=1e-4)
    for layer in (0, 1, 2):  # 0: the embeddings' output, 2: the last block's after the final norm
        h = files[("hidden_states", layer)]
        assert h.shape == (t, 32) and h.dtype == np.float32
        np.testing.assert_allclose(h, hidden_ref[layer], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind, kinds, model", [("paged", BOTH, "tiny"), ("sequential", ["hidden_states"], "gpt2"),
                                                ("sequential", ["hidden_states"], "tiny")])
def test_greedy_output_is_identical_with_and_without_capture(tiny_model, gpt2_model, kind, kinds, model):
    path = tiny_model if model == "tiny" else gpt2_model
    e = load_engine(path, engine=kind, measure=False)
    prompts = [e.encode(p) for p in ("the kernel runs", "中文 and more", "a")]
    for pid, ids in enumerate(prompts, 1):
        e.add(pid, ids, {"max_new_tokens": 20, **GREEDY})
    plain = run(e)
    for pid, ids in enumerate(prompts, 1):
        e.add(pid, ids, {"max_new_tokens": 20, **GREEDY, **({"capture": spec(kinds)} if pid != 2 else {})})
    captured = run(e)
    assert captured == plain
    assert model == "gpt2" or len(set(plain[1])) > 3  # a degenerate output would prove little
    got = files_of(e)
    assert sorted(got) == [1, 3]
    files, done = got[1]
    assert done.tokens == len(prompts[0]) + 19
    assert files[("hidden_states", 0)].shape[0] == done.tokens


def test_the_sequential_engine_captures_transformers_hidden_states(gpt2_model):
    e = load_engine(gpt2_model, engine="sequential", measure=False)
    ids = e.encode("hello there")
    e.add(1, ids, {"max_new_tokens": 6, **GREEDY, "capture": spec(["hidden_states"], layers=[0, 2])})
    toks = run(e)
    (files, done), = files_of(e).values()
    _, hidden_ref = reference(gpt2_model, ids + toks[1][:-1])
    assert sorted(files) == [("hidden_states", 0), ("hidden_states", 2)]
    for layer in (0, 2):
        np.testing.assert_allclose(files[("hidden_states", layer)], hidden_ref[layer], atol=1e-4, rtol=1e-4)


def test_the_sequential_engine_refuses_attentions_naming_the_engine_that_captures_them(gpt2_model):
    e = load_engine(gpt2_model, engine="sequential", measure=False)
    with pytest.raises(InvalidArgument, match="sequential engine cannot capture attentions.*paged engine"):
        e.add(1, e.encode("hi"), {"max_new_tokens": 2, **GREEDY, "capture": spec()})
    assert not e.seqs


def test_a_capture_stops_at_its_byte_limit_with_a_warning_and_the_generation_goes_on(tiny_model):
    e = load_engine(tiny_model, engine="paged", measure=False)
    ids = e.encode("limits")
    limit = file_bytes((10, 32)) + file_bytes((10, 4, 10))  # ten tokens of one hidden and one attention layer
    e.add(1, ids, {"max_new_tokens": 12, **GREEDY, "capture": spec(layers=[1], max_bytes=limit + 100)})
    e.add(2, ids, {"max_new_tokens": 12, **GREEDY})
    toks = run(e)
    assert toks[1] == toks[2] and len(toks[1]) == 12
    (files, done), = files_of(e).values()
    assert done.tokens == 10 and files[("attentions", 1)].shape == (10, 4, 10)
    assert files[("hidden_states", 1)].shape == (10, 32)
    assert done.warnings == [f"capture stopped at 10 tokens: the test's limit ({limit + 100:,} bytes) holds no more"]


def test_positions_recomputed_after_a_preemption_are_captured_once_and_match(tiny_model):
    e = load_engine(tiny_model, engine="paged", block_size=4, measure=False)
    ids = e.encode("preempt me")
    e.add(1, ids, {"max_new_tokens": 10, **GREEDY, "capture": spec(["attentions"], layers=[1])})
    first = [t for _ in range(4) for ev in e.step() for t in ev.token_ids]
    assert e.preempt(1, "recompute").preempted == "recompute"
    e.resume(1)
    out = first + run(e)[1]
    (files, done), = files_of(e).values()
    attn_ref, _ = reference(tiny_model, ids + out[:-1])
    assert e.recomputed_tokens > 0
    assert done.tokens == len(ids) + 9
    np.testing.assert_allclose(files[("attentions", 1)], attn_ref[1], atol=1e-4)


def test_a_step_that_yields_to_an_urgent_arrival_keeps_none_of_its_capture(tiny_model):
    e = load_engine(tiny_model, engine="paged", measure=False)
    ids = e.encode("yield")
    asked = []
    e.urgent_waiting = lambda floor: not asked.append(floor) and len(asked) == 1  # the first step yields
    e.add(1, ids, {"max_new_tokens": 4, **GREEDY, "capture": spec(["hidden_states"])})
    toks = run(e)
    assert e.yields == 1
    (files, done), = files_of(e).values()
    _, hidden_ref = reference(tiny_model, ids + toks[1][:-1])
    assert done.tokens == len(ids) + 3
    np.testing.assert_allclose(files[("hidden_states", 2)], hidden_ref[2], atol=1e-4, rtol=1e-4)


def test_frames_are_bounded_pieces_of_exactly_what_np_save_writes(tiny_model):
    e = load_engine(tiny_model, engine="paged", measure=False)
    e.add(4, e.encode("frames"), {"max_new_tokens": 5, **GREEDY, "capture": spec(layers=[0])})
    run(e)
    (pid, cap), = e.captured
    msgs = list(cap.frames(pid, frame_bytes=256))
    assert isinstance(msgs[-1], CaptureDone) and msgs[-1].key == 5 and msgs[-1].pid == 4
    for kind in ("attentions", "hidden_states"):
        pieces = [m for m in msgs if isinstance(m, Captured) and m.kind == kind]
        data = b"".join(m.data for m in pieces)
        assert all(len(m.data) <= 256 for m in pieces)
        assert [m.last for m in pieces] == [False] * (len(pieces) - 1) + [True]
        arr = np.load(io.BytesIO(data))
        saved = io.BytesIO()
        np.save(saved, arr)
        assert data == saved.getvalue() and len(data) == file_bytes(pieces[0].shape)


def test_a_process_that_ends_before_its_first_step_sends_an_empty_capture_with_a_warning(tiny_model):
    e = load_engine(tiny_model, engine="paged", measure=False)
    e.add(1, e.encode("never"), {"max_new_tokens": 5, **GREEDY, "capture": spec()})
    e.abort(1)
    (files, done), = files_of(e).values()
    assert files == {} and done.files == 0 and "ended before the model processed" in done.warnings[0]


@pytest.mark.parametrize("kinds, layers, heads, message", [
    (["attentions"], [2], None, r"capture_layers \[2\] out of range: the model has 2 layers"),
    (["hidden_states"], [3], None, r"capture_layers \[3\] out of range"),
    (BOTH, [0, 0], None, "duplicates"),
    (BOTH, None, [4], r"capture_heads \[4\] out of range: the model has 4 heads"),
    (BOTH, None, [1, 1], "distinct head numbers"),
])
def test_a_capture_the_model_cannot_make_is_einval_naming_why(kinds, layers, heads, message):
    with pytest.raises(InvalidArgument, match=message):
        resolve(CaptureSpec(tuple(kinds), layers, heads, 0, 0), 2, 4, tuple(BOTH), "paged")


def test_layer_l_is_a_hidden_state_only_and_a_session_cannot_capture(tiny_model):
    hidden, attn, heads = resolve(CaptureSpec(tuple(BOTH), (0, 2), None, 0, 0), 2, 4, tuple(BOTH), "paged")
    assert hidden == [0, 2] and attn == [0] and heads == [0, 1, 2, 3]
    e = load_engine(tiny_model, engine="paged", measure=False)
    with pytest.raises(InvalidArgument, match="a session cannot capture"):
        e.add(1, e.encode("hi"), {"max_new_tokens": 2, **GREEDY, "capture": spec()}, session=True)
