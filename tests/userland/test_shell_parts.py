"""The shell's parts without a kernel: chat's multi-line input and /set, Tab completion, the tables it prints."""

from __future__ import annotations

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from llmos.shell_chat import FIELDS, SETTINGS, Multiline, parse_setting
from llmos.shell_complete import Cached, ChatCompleter, ShellCompleter
from llmos.shell_views import format_devices, format_metrics, printable
from llmos.syscalls.errors import InvalidArgument


def feed(lines: list[str]) -> list[tuple[str, bool] | None]:
    m = Multiline()
    return [m.feed(line) for line in lines]


def test_triple_quotes_open_and_close_a_multi_line_message_as_in_ollama():
    assert feed(['"""first', "second", 'third"""']) == [None, None, ("first\nsecond\nthird", True)]
    assert feed(['"""', "only", '"""']) == [None, None, ("only", True)]  # the quote lines add no blank lines
    assert feed(['"""one line"""', "plain"]) == [("one line", True), ("plain", False)]
    assert feed(['"""/bye', 'is text"""']) == [None, ("/bye\nis text", True)]  # quoted: a message, not a command
    assert feed(['/set system """Be', 'brief."""']) == [None, ("/set system Be\nbrief.", False)]
    assert feed(['/system """x"""']) == [("/system x", False)]
    assert feed(['say """ in the middle']) == [('say """ in the middle', False)]  # only at the start opens
    m = Multiline()
    assert m.feed('"""open') is None and m.open
    m.cancel()  # Ctrl-C drops the block
    assert not m.open and m.feed("next") == ("next", False)


def test_set_takes_its_type_and_range_from_the_syscall_table():
    assert parse_setting("temperature", ["0.2"]) == ("temperature", 0.2)
    assert parse_setting("max_tokens", ["64"]) == ("max_new_tokens", 64)  # Ollama's and OpenAI's names too
    assert parse_setting("num_predict", ["8"]) == ("max_new_tokens", 8)
    assert parse_setting("repeat_penalty", ["1.1"]) == ("repetition_penalty", 1.1)
    assert parse_setting("TOP_K", ["40"]) == ("top_k", 40)
    assert parse_setting("stop", ["User:", "###"]) == ("stop", ["User:", "###"])
    assert parse_setting("ignore_eos", ["on"]) == ("ignore_eos", True)
    top = FIELDS["temperature"].max
    with pytest.raises(InvalidArgument, match=rf"temperature must be <= {top}; got 500"):
        parse_setting("temperature", ["500"])
    with pytest.raises(InvalidArgument, match="top_p must be <= 1.0"):
        parse_setting("top_p", ["1.5"])
    with pytest.raises(InvalidArgument, match="seed must be an integer, got 'x'"):
        parse_setting("seed", ["x"])
    with pytest.raises(InvalidArgument, match="takes one value, got 2"):
        parse_setting("seed", ["1", "2"])
    with pytest.raises(InvalidArgument, match="needs a value"):
        parse_setting("top_k", [])
    with pytest.raises(InvalidArgument, match="true or false"):
        parse_setting("ignore_eos", ["maybe"])
    with pytest.raises(InvalidArgument, match="at most 16"):
        parse_setting("stop", [str(i) for i in range(17)])
    with pytest.raises(InvalidArgument, match="unknown parameter 'warmth'; one of: temperature"):
        parse_setting("warmth", ["1"])
    assert set(SETTINGS.values()) <= set(FIELDS)  # every name /set takes is a field spawn has


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def complete(completer, text: str) -> list[str]:
    return [c.text for c in completer.get_completions(Document(text), CompleteEvent(completion_requested=True))]


def shell_completer(clock=None, calls=None):
    calls = calls if calls is not None else []

    def pids():
        calls.append("ps")
        return [(7, "RUNNING root tiny"), (12, "BLOCKED root tiny"), (120, "ZOMBIE root tiny")]

    def models():
        calls.append("models")
        return [("/m/tiny", "loaded"), ("qwen", "in the store"), ("default", "the shipped default model")]

    def entries(directory):
        calls.append(f"ls {directory}")
        return {"/": [("models", True), ("data", True)], "/data": [("notes.txt", False), ("sets", True)]}[directory]

    return ShellCompleter({"models": "", "metrics": "", "kill": "", "stat": "", "ls": "", "chat": "", "run": ""},
                          pids, models, entries, ttl=2.0, clock=clock or Clock()), calls


def test_tab_completes_commands_pids_signals_models_and_paths_each_where_it_belongs():
    c, _ = shell_completer()
    assert complete(c, "m") == ["metrics", "models"]
    assert complete(c, "kill ") == ["7", "12", "120"]
    assert complete(c, "stat 12") == ["12", "120"]
    assert complete(c, "kill 7 s") == ["STOP"]
    assert complete(c, "kill 7 STOP ") == []
    assert complete(c, "chat ") == ["/m/tiny", "qwen", "default"]
    assert complete(c, "run --model q") == ["qwen"]
    assert complete(c, "run -n ") == []  # the value of an option: nothing to offer
    assert complete(c, "run --temperature 0 hello ") == []
    assert complete(c, "ls ") == ["/models/", "/data/"]
    assert complete(c, "ls /data/n") == ["/data/notes.txt"]
    assert complete(c, "ls data") == []  # the namespace's paths are absolute


def test_completion_asks_the_kernel_only_on_tab_and_at_most_once_per_ttl_and_survives_a_failure():
    clock = Clock()
    c, calls = shell_completer(clock)
    assert calls == []  # built: nothing fetched
    complete(c, "m")
    assert calls == []  # commands need no kernel
    complete(c, "kill ")
    complete(c, "kill 1")
    assert calls == ["ps"]
    clock.now = 2.5
    complete(c, "kill ")
    assert calls == ["ps", "ps"]

    def broken():
        raise ConnectionError("kernel gone")

    gone = Cached(broken)
    assert gone.get() == []  # no completions, and no exception into the prompt


def test_chat_completes_its_commands_and_the_names_set_takes():
    shell, _ = shell_completer()
    c = ChatCompleter({"/set": "", "/show": "", "/system": "", "/bye": "", "/load": ""}, {"temperature": "",
                      "top_k": ""}, shell.models)
    assert complete(c, "/s") == ["/set", "/show", "/system"]
    assert complete(c, "/set t") == ["temperature", "top_k"]
    assert complete(c, "/set s") == ["system"]
    assert complete(c, "/set parameter t") == ["temperature", "top_k"]
    assert complete(c, "/load q") == ["qwen"]
    assert complete(c, "/show ") == ["parameters", "system", "model"]
    assert complete(c, "hello t") == []  # a message is not completed


METRICS = {
    "processes": [], "omitted": 0, "counts": {"RUNNING": 2, "BLOCKED": 1, "ZOMBIE": 0},
    "finished": {"count": 3, "tokens_in": 20, "tokens_out": 50, "finish_reasons": {"length": 2, "stop": 1},
                 "queue_time_s": {"mean": 0.001, "p50": 0.001, "p95": 0.002, "max": 0.003},
                 "ttft_s": {"mean": 0.0104, "p50": 0.01, "p95": 0.02, "max": 0.03},
                 "tpot_s": {"mean": 0.0045, "p50": 0.004, "p95": 0.005, "max": 0.006},
                 "total_time_s": {"mean": 0.03, "p50": 0.03, "p95": 0.04, "max": 0.05}},
    "models": [{"model": "/models/tiny", "executor": 1, "steps": 9, "batch_mean": 1.5, "tokens_out": 50, "kv_used": 3,
                "kv_total": 512, "preemptions": 1, "swaps_out": 2, "swaps_in": 2, "step_time_mean_s": 0.005}],
}


def test_metrics_for_people_show_counts_reasons_latency_in_ms_and_each_model():
    text = format_metrics(METRICS)
    assert "processes: running 2, blocked 1" in text and "finished: 3 (length 2, stop 1)" in text
    assert "tokens in 20, out 50" in text
    ttft = next(ln for ln in text.splitlines() if ln.startswith("ttft"))
    assert ttft.split() == ["ttft", "10.4", "10.0", "20.0", "30.0"]  # milliseconds
    row = next(ln for ln in text.splitlines() if ln.startswith("/models/tiny"))
    assert row.split() == ["/models/tiny", "#1", "9", "1.5", "50", "3/512", "1", "2/2", "5.0"]  # one row per instance
    assert "(no model loaded)" in format_metrics({"counts": {}, "finished": {}, "models": []})


def test_devices_show_memory_in_mib_what_models_hold_and_each_gpu():
    cpu = {"kind": "cpu", "name": "cpu", "cores_logical": 2, "load_avg": [0.5, 0, 0], "memory_total_bytes": 8 * 2**30,
           "memory_available_bytes": 4 * 2**30, "reserved_bytes": 352 * 2**20, "budget_bytes": 6 * 2**30,
           "holders": {"/models/tiny#0": 352 * 2**20}}
    text = format_devices([cpu])
    assert text.splitlines()[1].split()[:10] == ["cpu", "cpu", "8,192", "MiB", "4,096", "MiB", "352", "MiB", "6,144",
                                                 "MiB"]
    assert "352 MiB  /models/tiny#0" in text and text.endswith("(no GPU)")
    gpu = {"kind": "gpu", "name": "cuda:0", "model": "NVIDIA H200", "memory_total_bytes": 140 * 2**30,
           "memory_free_bytes": 100 * 2**30, "reserved_bytes": 0, "budget_bytes": 130 * 2**30, "utilization_pct": 37,
           "holders": {}}
    text = format_devices([cpu, gpu])
    assert "cuda:0" in text and "NVIDIA H200, 37% busy" in text and "(no GPU)" not in text


def test_model_output_cannot_drive_the_terminal_that_shows_it():
    assert printable("a\x1b[2Jb\rc\x07\x9b") == "a\\x1b[2Jb\\x0dc\\x07\\x9b"
    assert printable("tab\tnew\nline é 中") == "tab\tnew\nline é 中"
