from llmos import LLMOSError, NoSuchProcess
from llmos.syscalls import errors
from llmos.syscalls.errors import MEANING, Errno, error_from_errno, quote, wire_error


def test_an_errno_from_the_wire_becomes_the_class_named_by_its_fault():
    err = error_from_errno(3, "no process 9")
    assert isinstance(err, NoSuchProcess) and isinstance(err, LLMOSError)
    assert err.errno is Errno.ESRCH and "no process 9" in str(err)


def test_an_unknown_errno_still_becomes_an_llmos_error():
    err = error_from_errno(9999, "strange")
    assert type(err) is LLMOSError and "9999" in err.message


def test_every_errno_maps_to_its_own_class_not_the_fallback():
    classes = {}
    for code in Errno:
        err = error_from_errno(int(code), "x")
        assert type(err) is not LLMOSError, f"{code.name} has no class of its own"
        assert err.errno is code and type(err).errno_default is code
        classes[type(err)] = code
    assert len(classes) == len(Errno)
    exported = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, LLMOSError)
                and c is not LLMOSError]
    # the one class no errno maps to: a client-side refinement of KernelGone (a call pending on a kernel that restarted)
    assert set(exported) - {errors.KernelRestarted} == set(classes)
    assert issubclass(errors.KernelRestarted, errors.KernelGone)


def test_every_errno_says_what_it_means():
    assert set(MEANING) == set(Errno) and all(MEANING.values())


def test_the_wire_error_is_built_in_one_place_and_bounded():
    w = wire_error(Errno.ESRCH, "y" * 10_000)
    assert w["errno"] == 3 and w["error"] == "ESRCH" and len(w["message"]) <= errors.MAX_MESSAGE_CHARS
    assert errors.InvalidArgument("z" * 5000).to_wire() == wire_error(Errno.EINVAL, "z" * 5000)


def test_quote_shows_a_short_prefix_of_any_input():
    assert quote("abc") == "'abc'"
    for value in ("q" * 10_000_000, b"b" * 10_000_000, ["s" * 1_000_000] * 1000, {("k" * 10**6): 1},
                  [[[[["deep"] * 100] * 100] * 100]]):
        assert len(quote(value)) < 200
    assert "10000000 characters" in quote("q" * 10_000_000)


def test_a_long_path_is_quoted_by_its_start_and_its_telling_end():
    from llmos.syscalls.errors import QUOTE_CHARS, quote_path

    path = "/srv/models/" + "x" * 500 + "/tiny-llama"
    q = quote_path(path)
    assert q.startswith("'/srv/models/") and "tiny-llama'" in q and f"({len(path)} characters)" in q
    assert len(q) < QUOTE_CHARS + 40 and quote_path("/m") == "'/m'"
