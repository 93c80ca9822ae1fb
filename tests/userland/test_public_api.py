"""The names a program imports from llmos are pinned: adding or removing one is a decision."""

import os

import llmos
from llmos._wire import model_arg, spawn_args
from llmos.types import ProcessResult


def test_the_public_names_are_exactly_these():
    assert sorted(llmos.__all__) == sorted([
        "LLMOS", "Client", "AsyncClient", "OutputStream", "ProcessResult", "ProcessInfo", "Stats",
        "LLMOSError", "Errno", "InvalidArgument", "NotFound", "NoSuchProcess", "NotPermitted", "TimedOut",
        "TooBig", "DeviceError", "KernelGone", "KernelUnavailable", "QuotaExceeded", "TryAgain", "Busy",
        "TurnResult", "Session", "KernelRestarted", "NoSpace",
    ])
    for name in llmos.__all__:
        assert getattr(llmos, name) is not None


def test_every_error_class_is_an_llmos_error_with_its_own_errno():
    errors = [getattr(llmos, n) for n in llmos.__all__ if n.endswith(("Error", "Argument", "Found", "Process",
                                                                       "Permitted", "Out", "Big", "Gone",
                                                                       "Unavailable", "Exceeded", "Again",
                                                                       "Busy"))]
    assert all(issubclass(e, llmos.LLMOSError) for e in errors)
    assert len({e.errno_default for e in errors if e is not llmos.LLMOSError}) == len(errors) - 1


def test_relative_model_paths_are_resolved_on_the_client(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    assert model_arg("m") == str(tmp_path / "m") and model_arg("./x") == str(tmp_path / "x")
    assert model_arg("default") == "default" and model_arg(None) is None
    assert model_arg(os.fspath(tmp_path / "m")) == str(tmp_path / "m")


def test_a_model_path_the_client_cannot_look_at_goes_to_the_kernel_as_given():
    for text in ("/" + "a" * 300, "~no-such-user-here/m"):
        assert model_arg(text) == text  # the kernel answers EINVAL/ENOENT saying why; the client never crashes


def test_spawn_args_drop_unset_fields():
    assert spawn_args("hi", None, None, 3, {"seed": None, "top_k": 5}) == {"prompt": "hi", "priority": 3, "top_k": 5}


def test_a_result_is_built_from_its_wire_map():
    r = ProcessResult.from_wire({"pid": 4, "text": "t", "token_ids": [1], "finish_reason": "stop", "state": "ZOMBIE",
                                 "error": None, "signal": None, "extra": 1,
                                 "stats": {"prompt_tokens": 2, "output_tokens": 1, "ttft_s": 0.1, "new": 0}})
    assert r.stats.ttft_s == 0.1 and r.stats.output_tokens == 1 and r.finish_reason == "stop"
