import pytest

from llmos.drivers.model.text import TextTracker


class CharTokenizer:
    """A tokenizer whose ids are code points; id 0 stands for half of a multi-byte character."""

    def decode(self, ids, skip_special_tokens=True, **kw):
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

    def decode(self, ids, **kw):
        self.sizes.append(len(ids))
        return self.inner.decode(ids, **kw)


def real_tokenizers(tiny_model):
    from transformers import AutoTokenizer

    from llmos.drivers.model.registry import DEFAULT_MODEL_DIR

    # byte-level BPE over single bytes (multi-byte characters span tokens) and the default model's BPE
    return [AutoTokenizer.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)]


def byte_level_bytes(tok, ids):
    """The bytes a byte-level BPE tokenizer decodes ``ids`` from (special tokens skipped)."""
    table = {c: b for b, c in _bytes_to_unicode().items()}
    added = {i: t for i, t in tok.added_tokens_decoder.items()}
    skipped = set(tok.all_special_ids) | {i for i, t in added.items() if t.special}
    return b"".join(b"" if i in skipped else added[i].content.encode() if i in added
                    else bytes(table[c] for c in tok.convert_ids_to_tokens(i)) for i in ids)


def ends_inside_a_character(data: bytes) -> bool:
    """True when ``data`` ends with the first bytes of a UTF-8 character whose other bytes could still come."""
    for back in range(1, min(3, len(data)) + 1):
        lead = data[-back]
        if 0x80 <= lead <= 0xBF:
            continue  # a continuation byte: look further back for the lead
        size = 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0
        second = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}
        lo, hi = second.get(lead, (0x80, 0xBF))
        rest = data[len(data) - back + 1:]
        return back < size and (not rest or lo <= rest[0] <= hi)
    return False


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
            full = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            # only a character left unfinished at the end is dropped (one U+FFFD in byte-level decoding); a
            # U+FFFD for invalid bytes is text like any other
            dangling = ends_inside_a_character(byte_level_bytes(tok, ids))
            assert out == t.text and t.text + "\ufffd" * dangling == full


def test_each_update_decodes_only_the_new_tail(tiny_model):
    tok = CountingTokenizer(real_tokenizers(tiny_model)[1])
    ids = tok.inner.encode("the value of the current value is returned. " * 40, add_special_tokens=False)
    t = TextTracker(tok, ["never"])
    for i in range(len(ids)):
        t.update(ids[:i + 1])
    assert len(ids) > 300 and max(tok.sizes) <= 4


def sentencepiece_style_tokenizer():
    """Llama-style: words carry a leading "▁" that decodes to a space, an end-of-sequence special
    token, and transformers' clean-up of spaces before punctuation switched on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "▁Hello", "▁world", "▁I", "▁said", "▁it", "'s", "▁'", "s", "▁fine", ",", "▁isn", "'t",
             "?", "▁.", "▁这", "是"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                   clean_up_tokenization_spaces=True), {w: i for i, w in enumerate(words)}


def stream(tok, ids, stop=()):
    t = TextTracker(tok, list(stop))
    out = ""
    for i in range(len(ids)):
        out += t.update(ids[:i + 1])
        if t.stopped:
            break
    return out + t.finish(), t


def test_a_skipped_special_token_between_words_keeps_the_space():
    tok, ids = sentencepiece_style_tokenizer()
    out, _ = stream(tok, [ids["▁Hello"], ids["</s>"], ids["▁world"], ids["</s>"], ids["</s>"], ids["▁这"], ids["是"]])
    assert out == "Hello world 这是"


def test_streamed_text_is_never_rewritten_by_space_clean_up():
    tok, ids = sentencepiece_style_tokenizer()
    words = ["▁I", "▁said", "▁it", "▁'", "s", "▁fine", ",", "▁isn", "'t", "▁it", "?", "▁."]
    seq = [ids[w] for w in words]
    out, t = stream(tok, seq)
    assert out == t.text == tok.decode(seq, clean_up_tokenization_spaces=False) == "I said it 's fine, isn't it? ."


def test_a_stop_string_spanning_tokens_ends_the_text_before_it():
    tok, ids = sentencepiece_style_tokenizer()
    seq = [ids[w] for w in ["▁I", "▁said", "▁it", "'s", "▁fine", ",", "▁world"]]
    out, t = stream(tok, seq, stop=["t's fi"])
    assert t.stopped and out == t.text == "I said i"


# -- several stop strings: the first completed match wins ---------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character map of byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def per_byte_ids(tok, text):
    """``text`` as one single-byte token per byte of a byte-level BPE vocabulary."""
    table = _bytes_to_unicode()
    return tok.convert_tokens_to_ids([table[b] for b in text.encode()])


def first_completed_cut(text, stops):
    """The reference: feed the text one character at a time and cut at the first stop string completed."""
    for k in range(1, len(text) + 1):
        hits = [s for s in stops if text[:k].endswith(s)]
        if hits:
            return text[:k - max(map(len, hits))]
    return text


def test_the_stop_string_that_completes_first_wins_whatever_the_list_order_and_the_tokenization():
    import itertools
    import random

    from transformers import AutoTokenizer

    from llmos.drivers.model.registry import DEFAULT_MODEL_DIR

    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    assert tok.encode(" value", add_special_tokens=False) == [516]  # " value" is one token
    rng = random.Random(0)
    cases = [(" value", [" value", "alu"]), (" value of the value", ["f t", "of", "the v"])]
    for text in (" value of the current value", "return the value.\nvalue"):
        for _ in range(12):
            subs = {text[i:i + rng.randint(1, 7)] for i in rng.sample(range(len(text)), 3)}
            cases.append((text, sorted(subs)))
    for text, stops in cases:
        want = first_completed_cut(text, stops)
        for ids in (tok.encode(text, add_special_tokens=False), per_byte_ids(tok, text)):
            for order in itertools.permutations(stops):
                t = TextTracker(tok, list(order))
                out = ""
                for i in range(len(ids)):
                    out += t.update(ids[:i + 1])
                    if t.stopped:
                        break
                out += t.finish()
                assert out == t.text == want, (text, order, ids)
    assert first_completed_cut(" value", [" value", "alu"]) == " v"


# -- the output decoded in the context of the prompt --------------------------------------------------------

def decoder_kinds():
    from transformers import AutoTokenizer

    from llmos.drivers.model.registry import DEFAULT_MODEL_DIR
    from tests.tinymodel import metaspace_tokenizer, wordpiece_tokenizer

    return {"byte-level BPE": (AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR),
                               "Return the value of the current kernel, 这是 ✓ value."),
            "Metaspace (Llama-2 decoder)": (metaspace_tokenizer(), "The model runs the kernel, I said."),
            "Metaspace decoder": (metaspace_tokenizer(llama2_decoder=False), "Hello world. The kernel's model runs"),
            "WordPiece": (wordpiece_tokenizer(), "hello world, the model running unbelievable runs. don't")}


@pytest.mark.parametrize("kind", list(decoder_kinds()))
def test_prompt_text_plus_streamed_output_equals_the_decoded_whole_for_every_decoder_kind(kind):
    tok, sentence = decoder_kinds()[kind]
    ids = tok(sentence)["input_ids"]

    def dec(x):
        return tok.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    for k in range(1, len(ids)):
        prompt, output = ids[:k], ids[k:]
        if dec(prompt).endswith("\ufffd"):
            continue  # a prompt cut inside a character: the next test's case
        t = TextTracker(tok, [], prompt)
        streamed = "".join(t.update(output[:i + 1]) for i in range(len(output))) + t.finish()
        assert dec(prompt) + streamed == dec(prompt) + t.text == dec(ids), (kind, k)


def test_a_prompt_ending_inside_a_character_gives_the_completed_character_to_the_output(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)  # one token per byte
    for char in ("中", "✓", "🙂"):
        raw = tok.encode("Return the" + char + " value", add_special_tokens=False)
        start = len(tok.encode("Return the", add_special_tokens=False))
        for cut in range(start + 1, start + len(char.encode())):  # every split inside the character
            t = TextTracker(tok, [], raw[:cut])
            chunks = [t.update(raw[cut:i + 1]) for i in range(cut, len(raw))] + [t.finish()]
            assert "".join(chunks) == t.text == char + " value", (char, cut)
            assert not any("\ufffd" in c for c in chunks)


# -- decided text: never retracted, and the only text stop strings see ---------------------------------------

def test_text_already_streamed_is_never_retracted_at_a_byte_fallback_boundary_whatever_the_split():
    from tests.tinymodel import byte_fallback_tokenizer

    tok = byte_fallback_tokenizer()

    def dec(x):
        return tok.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    prompt = tok("The model")["input_ids"]
    nl, e4, b8, the = tok.convert_tokens_to_ids(["<0x0A>", "<0xE4>", "<0xB8>", "▁the"])
    valid = tok.encode(" runs\n中 the kernel ✓\n\n🙂 world", add_special_tokens=False)
    assert nl in valid and e4 in valid  # byte tokens next to each other: newline, then a character's first byte
    for k in range(1, len(valid) + 1):  # the process ends after k tokens
        t = TextTracker(tok, [], prompt)
        streamed = "".join(t.update(valid[:i + 1]) for i in range(k)) + t.finish()
        whole = max(j for j in range(k + 1) if "\ufffd" not in dec(prompt + valid[:j]))  # a dangling character dropped
        assert streamed == t.text == dec(prompt + valid[:whole])[len(dec(prompt)):], k
    # the field case: "\n" streamed, then 0xE4 and the end (ByteFallback decodes <0x0A><0xE4> as two U+FFFDs)
    # (after the newline, new bytes decode as the tokenizer decodes them: an invalid run is all U+FFFDs)
    for output, final in (([nl, e4], "\n"), ([nl, e4, b8], "\n"), ([nl, e4, the], "\n\ufffd the"),
                          ([nl, e4, nl, e4], "\n\ufffd\ufffd")):
        t = TextTracker(tok, [], prompt)
        chunks = [t.update(output[:i + 1]) for i in range(len(output))] + [t.finish()]
        assert chunks[0] == "\n" and "".join(chunks) == t.text == final, output


def test_a_stop_string_never_matches_a_character_that_is_only_half_generated(tiny_model):
    from transformers import AutoTokenizer

    from tests.tinymodel import byte_fallback_tokenizer

    for tok in (AutoTokenizer.from_pretrained(tiny_model), byte_fallback_tokenizer()):  # byte-level, byte fallback
        ids = tok.encode("中 value", add_special_tokens=False)
        assert sum(tok.decode([i]) == "\ufffd" for i in ids) == 3  # 中 is three byte tokens
        out, t = stream(tok, ids, stop=["\ufffd"])
        assert (out, t.text, t.stopped) == ("中 value", "中 value", False), type(tok).__name__
        # a genuine U+FFFD (its own three bytes) still matches, followed by more text or at the very end
        for text in ("a\ufffdb", "a\ufffd"):
            out, t = stream(tok, tok.encode(text, add_special_tokens=False), stop=["\ufffd"])
            assert (out, t.text, t.stopped) == ("a", "a", True), (type(tok).__name__, text)


def test_a_stop_string_never_matches_the_placeholder_of_an_incomplete_character_without_token_bytes():
    t = TextTracker(CharTokenizer(), ["\ufffd"])  # no byte view: a trailing U+FFFD might be half a character
    assert t.update([ord("a"), 0]) == "a" and not t.stopped
    assert t.update([ord("a"), 0x4E2D]) == "中" and not t.stopped
    assert t.update([ord("a"), 0x4E2D, 0xFFFD, ord("b")]) == "" and t.stopped and t.text == "a中"


def test_a_character_whose_bytes_are_split_by_skipped_special_tokens_is_still_one_character(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    e4, b8, ad = tok.encode("中", add_special_tokens=False)
    special = tok.convert_tokens_to_ids("<|im_end|>")
    out, t = stream(tok, [e4, *[special] * 10, b8, special, ad, special], stop=["\ufffd"])
    assert (out, t.text, t.stopped) == ("中", "中", False)
