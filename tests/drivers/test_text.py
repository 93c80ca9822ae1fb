from llmos.drivers.model.text import TextTracker


class CharTokenizer:
    """A tokenizer whose ids are code points; id 0 stands for half of a multi-byte character."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("\ufffd" if i == 0 else chr(i) for i in ids)


def feed(tracker, text):
    ids, out = [], []
    for ch in text:
        ids.append(ord(ch))
        out.append(tracker.update(ids))
        if tracker.stopped:
            break
    return ids, out


def test_text_that_could_begin_a_stop_string_is_held_back():
    t = TextTracker(CharTokenizer(), ["END"])
    _, out = feed(t, "abcEN")
    assert "".join(out) == "abc"
    assert t.finish() == "EN"


def test_a_stop_string_truncates_and_nothing_past_it_is_streamed():
    t = TextTracker(CharTokenizer(), ["END", "zz"])
    _, out = feed(t, "hello ENDworld")
    assert t.stopped and "".join(out) == "hello " and t.text == "hello "


def test_an_incomplete_character_is_held_until_it_completes():
    t = TextTracker(CharTokenizer(), [])
    assert t.update([ord("a"), 0]) == "a"
    assert t.update([ord("a"), ord("b")]) == "b"


def test_without_stop_strings_every_character_streams_at_once():
    t = TextTracker(CharTokenizer(), [])
    _, out = feed(t, "xyz")
    assert out == ["x", "y", "z"]


class CountingTokenizer:
    """A real tokenizer that records how many ids each decode call was given."""

    def __init__(self, inner):
        self.inner, self.sizes = inner, []

    def decode(self, ids, skip_special_tokens=True):
        self.sizes.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def real_tokenizers(tiny_model):
    from transformers import AutoTokenizer

    from llmos.drivers.model.registry import DEFAULT_MODEL_DIR

    # byte-level BPE over single bytes (multi-byte characters span tokens) and the default model's BPE
    return [AutoTokenizer.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)]


def test_streamed_text_equals_a_full_decode_on_real_tokenizers(tiny_model):
    import random

    for tok in real_tokenizers(tiny_model):
        rng = random.Random(0)
        texts = ["def update(self, token_ids):\n    return 'ok'  # 这是一个关于 ✓", "  spaced   out . , !"]
        samples = [tok.encode(t, add_special_tokens=False) for t in texts]
        samples += [[rng.randrange(len(tok)) for _ in range(120)] for _ in range(5)]  # anything, even odd bytes
        for ids in samples:
            t = TextTracker(tok, [])
            out = "".join(t.update(ids[:i + 1]) for i in range(len(ids))) + t.finish()
            assert out == t.text == tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def test_each_update_decodes_only_the_new_tail(tiny_model):
    tok = CountingTokenizer(real_tokenizers(tiny_model)[1])
    ids = tok.inner.encode("the value of the current value is returned. " * 40, add_special_tokens=False)
    t = TextTracker(tok, ["never"])
    for i in range(len(ids)):
        t.update(ids[:i + 1])
    assert len(ids) > 300 and max(tok.sizes) <= 4
