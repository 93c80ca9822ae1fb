"""Prompts are checked the same way by the engine and by the kernel: token ids (length first), characters."""

import pytest

from llmos.drivers.model.prompt import check_prompt_chars, check_prompt_ids
from llmos.syscalls.errors import InvalidArgument, TooBig


def test_ids_inside_the_vocabulary_and_the_context_pass_as_a_list():
    assert check_prompt_ids((0, 5, 99), vocab_size=100, context_len=4) == [0, 5, 99]


@pytest.mark.parametrize("ids", [[], [-1], [100], [1, 2.0], [True], ["3"]])
def test_empty_out_of_range_or_non_integer_ids_are_invalid(ids):
    with pytest.raises(InvalidArgument, match=r"\[0, 100\)"):
        check_prompt_ids(ids, vocab_size=100, context_len=50)


def test_a_prompt_that_leaves_no_room_to_generate_is_too_big():
    with pytest.raises(TooBig, match="context holds 4"):
        check_prompt_ids([1, 2, 3, 4], vocab_size=100, context_len=4)


def test_a_prompt_ids_list_longer_than_the_context_is_e2big_before_its_items_are_looked_at():
    import time

    for junk in (["x"] * 1_000_000, [None] * 1_000_000, list(range(10**9, 10**9 + 1_000_000))):
        t = time.perf_counter()
        with pytest.raises(TooBig, match="prompt is 1000000 tokens; the model's context holds 512"):
            check_prompt_ids(junk, vocab_size=100, context_len=512)
        assert time.perf_counter() - t < 0.05


def test_the_items_of_a_long_prompt_ids_list_are_checked_in_one_fast_pass_naming_the_first_bad_one():
    import time

    ids = [7] * 999_999
    t = time.perf_counter()
    assert check_prompt_ids(ids, vocab_size=100, context_len=1_000_000) == ids
    assert time.perf_counter() - t < 0.5
    for bad, shown in ((100, "100"), (True, "True"), ("3", "'3'"), ("y" * 10_000, "10000 characters")):
        with pytest.raises(InvalidArgument, match=f"item 500000 is .*{shown}") as err:
            check_prompt_ids(ids[:500_000] + [bad] + ids[500_000:], vocab_size=100, context_len=1_000_001)
        assert len(err.value.message) < 200


@pytest.mark.parametrize("message", [
    {"role": "u " * 1_500_000, "content": "hi"},  # the field case: a 3M-character role
    {"role": "user", "content": "hi", "name": "n" * 3_000_000},  # any other field a template may render
    {"role": "user", "content": [{"type": "text", "text": "t" * 3_000_000}]},  # nested content parts
    {"role": "user", "content": "hi", "k" * 3_000_000: 1},  # keys are strings too
])
def test_every_string_of_a_chat_message_counts_against_the_character_bound(message):
    with pytest.raises(TooBig, match=r"messages hold 300\d{4} characters .*at most 2000000"):
        check_prompt_chars(None, [message], max_chars=2_000_000)
    check_prompt_chars(None, [message], max_chars=4_000_000)  # under the bound: left to the tokenizer


def test_a_deeply_nested_message_is_counted_without_exhausting_the_stack():
    deep = "x" * 10
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(TooBig):
        check_prompt_chars(None, [{"role": "user", "content": deep}], max_chars=5)


def test_the_character_bound_is_said_in_the_models_tokens_as_well():
    with pytest.raises(TooBig, match=r"prompt is 30000 characters; the model's context is 512 tokens, so at most "
                                     r"16384 characters \(512 tokens of at most 32 characters\) could fit"):
        check_prompt_chars("hello " * 5000, None, max_chars=16384, context_len=512)
