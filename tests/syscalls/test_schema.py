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


from llmos.syscalls import codec, protocol  # noqa: E402
from llmos.syscalls.table import SYSCALLS  # noqa: E402


@pytest.mark.parametrize("stop, fragment", [
    (["x" * 257], "item 0 of 'stop' has 257 characters"),
    (["\U0001F600" * 256] * 16, "at most 4,096 allowed"),
    (["y" * 256] * 16, "at most 4,096 allowed"),
])
def test_stop_strings_are_each_short_and_small_in_total(stop, fragment):
    with pytest.raises(InvalidArgument) as err:
        validate(SPAWN, {"prompt": "x", "stop": stop})
    assert fragment in err.value.message
    assert validate(SPAWN, {"prompt": "x", "stop": ["z" * 256] * 15})["stop"]


def test_chat_messages_are_bounded_in_total_like_the_prompt():
    big = [{"role": "user", "content": "c" * 400_000}] * 10
    with pytest.raises(InvalidArgument, match="'messages' takes"):
        validate(SPAWN, {"messages": big})
    assert validate(SPAWN, {"messages": [{"role": "user", "content": "c" * 3_900_000}]})["messages"]


@pytest.mark.parametrize("user", ["alice", "bob_2", "svc-llm", "first.last", "x@example.org", "1000", "A" * 64])
def test_ordinary_user_names_are_accepted(user):
    assert validate(BY_NAME["hello"].request, {"version": 1, "user": user})["user"] == user


@pytest.mark.parametrize("user", ["", "a b", "../etc", "-rf", ".hidden", "x\ny", "é", "A" * 65, "u" * 8_000_000,
                                  "tab\there", "semi;colon"])
def test_a_user_name_outside_the_safe_set_is_einval_with_a_short_message(user):
    with pytest.raises(InvalidArgument, match="field 'user'") as err:
        validate(BY_NAME["hello"].request, {"version": 1, "user": user})
    assert len(err.value.message) < 300


def test_every_request_field_that_carries_text_has_a_bound():
    for sc in SYSCALLS:
        for f in sc.request:
            if f.type == "str":
                assert f.max_len is not None or f.choices, (sc.name, f.name)
            elif f.type == "list[str]":
                assert f.max_len is not None and (f.max_bytes or f.item_max_len), (sc.name, f.name)
            elif f.type in ("list[map]", "map", "any"):
                assert f.max_bytes is not None, (sc.name, f.name)
            elif f.type.startswith("list["):
                assert f.max_len is not None, (sc.name, f.name)


def test_no_valid_spawn_makes_a_kernel_to_worker_message_over_the_frame_limit():
    # the largest valid request of each kind, as the executor forwards it (op encode, then op add)
    prompt = "\u00e9" * 4_000_000  # the most characters, two bytes each: just under the string bound
    assert len(prompt.encode()) <= protocol.MAX_STR_BYTES
    per = 3_999_000 // 10_000 - 40
    messages = [{"role": "user", "content": "m" * per}] * 10_000
    for args in ({"prompt": prompt}, {"messages": messages}):
        a = validate(SPAWN, args)
        codec.encode({"op": "encode", "rid": 2**63 - 1, "prompt": a["prompt"], "messages": a["messages"],
                      "prompt_ids": None})
    ids = [2**32 - 1] * 1_000_000
    stop = ["z" * 256] * 15  # the most stop text allowed
    a = validate(SPAWN, {"prompt_ids": ids, "stop": stop, "stop_token_ids": [2**31] * 64, "seed": 2**63 - 1})
    params = {k: v for k, v in a.items() if k not in ("prompt", "messages", "prompt_ids", "model", "priority",
                                                       "keep_alive")}
    frame = codec.encode({"op": "add", "pid": 2**62, "ids": a["prompt_ids"], "params": params, "user": "u" * 64,
                          "priority": 19})
    assert len(frame) < protocol.MAX_FRAME_BYTES // 2


def test_a_long_list_is_checked_whole_and_its_first_bad_item_named():
    from llmos.syscalls.table import lookup

    spawn = lookup("spawn").request
    ids = [7] * 1_000_000
    assert validate(spawn, {"prompt_ids": ids})["prompt_ids"] == ids
    for bad, kind in ((True, "bool"), ("7", "str"), (7.0, "float")):
        ids[123_456] = bad
        with pytest.raises(InvalidArgument, match=f"item 123456 of 'prompt_ids' must be an int, got {kind}"):
            validate(spawn, {"prompt_ids": ids})
        ids[123_456] = 7
