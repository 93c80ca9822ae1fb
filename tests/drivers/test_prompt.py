"""Token-id prompts are checked the same way by the engine and by the kernel."""

import pytest

from llmos.drivers.model.prompt import check_prompt_ids
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
