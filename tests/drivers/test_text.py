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
