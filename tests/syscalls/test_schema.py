import pytest

from llmos.syscalls.errors import InvalidArgument
from llmos.syscalls.schema import validate
from llmos.syscalls.table import BY_NAME

SPAWN = BY_NAME["spawn"].request


def test_defaults_are_filled_in_for_missing_optional_fields():
    args = validate(SPAWN, {"prompt": "hi"})
    assert args["max_new_tokens"] == 128 and args["priority"] == 0 and args["stop"] == []
    assert args["seed"] is None and args["model"] is None


@pytest.mark.parametrize("args, fragment", [
    ({"prompt": "x", "max_new_tokens": -1}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": "5"}, "must be an int"),
    ({"prompt": "x", "max_new_tokens": True}, "must be an int"),
    ({"prompt": "x", "priority": 20}, "priority"),
    ({"prompt": "x", "priority": -21}, "priority"),
    ({"prompt": "x", "temperature": float("nan")}, "finite"),
    ({"prompt": "x", "top_p": 0.0}, "top_p"),
    ({"prompt": "x", "stop": ["a", 3]}, "item 1 of 'stop'"),
    ({"prompt": "x", "stop": [str(i) for i in range(17)]}, "at most 16"),
    ({"prompt": "x", "bogus": 1}, "unknown field"),
    ({"prompt": 42}, "must be a string"),
])
def test_bad_fields_are_refused_with_a_message_naming_the_field(args, fragment):
    with pytest.raises(InvalidArgument) as err:
        validate(SPAWN, args)
    assert fragment in err.value.message


def test_missing_required_fields_are_named():
    with pytest.raises(InvalidArgument, match="missing required field 'pid'"):
        validate(BY_NAME["wait"].request, {})


def test_args_that_are_not_a_map_are_refused():
    with pytest.raises(InvalidArgument, match="must be a map"):
        validate(SPAWN, [1, 2])


def test_choices_are_enforced():
    with pytest.raises(InvalidArgument, match="one of TERM, KILL"):
        validate(BY_NAME["kill"].request, {"pid": 1, "signal": "HUP"})


def test_ints_are_accepted_where_floats_are_expected():
    assert validate(SPAWN, {"prompt": "x", "temperature": 0})["temperature"] == 0.0
