"""``top``'s frame is a pure function of metrics replies: rates, ordering, KV use and the session mark."""

import io

from llmos.top import Sample, frame, run_top

MODEL = "/models/tiny-llama"


def metrics(tokens_out: int, procs: list[dict]) -> dict:
    return {"processes": procs, "omitted": 0, "finished": {"count": 3},
            "counts": {"RUNNING": 1, "READY": 1, "BLOCKED": 1, "STOPPED": 0},
            "models": [{"model": MODEL, "executor": "e1", "worker_pid": 99, "batch_last": 2, "batch_mean": 1.5,
                        "batch_max": 4, "kv_used": 25, "kv_total": 100, "preemptions": 2, "tokens_out": tokens_out}]}


PROCS = [
    {"pid": 7, "state": "READY", "priority": 10, "owner": "bob", "model": MODEL, "prompt_tokens": 3,
     "output_tokens": 0, "kv_blocks": 0, "preemptions": 1, "session": False, "stats": {}},
    {"pid": 9, "state": "BLOCKED", "priority": 0, "owner": "ann", "model": MODEL, "prompt_tokens": 12,
     "output_tokens": 5, "kv_blocks": 3, "preemptions": 0, "session": True, "stats": {}},
    {"pid": 8, "state": "RUNNING", "priority": -5, "owner": "root", "model": MODEL, "prompt_tokens": 4,
     "output_tokens": 40, "kv_blocks": 6, "preemptions": 0, "session": False, "stats": {"tpot_s": 0.02}},
]


def rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["PID", "STATE"])
    return [ln.split() for ln in lines[start + 1:]]


def test_the_first_frame_shows_models_and_processes_running_first_with_the_decoding_rate():
    text = frame(Sample(10.0, metrics(100, PROCS)), clock=lambda: 0.0)
    head = text.splitlines()[0]
    assert "running 1, ready 1, blocked 1" in head and "finished: 3" in head and "tok/s: 50.0" in head
    model = next(ln for ln in text.splitlines() if ln.startswith(MODEL))
    assert model.split()[1:] == ["2", "1.5", "4", "25/100", "25.0%", "2", "50.0"]
    assert [r[:3] for r in rows(text)] == [["8", "RUNNING", "-5"], ["7", "READY", "10"], ["9", "BLOCKED", "0"]]
    assert rows(text)[2][-2:] == ["*", MODEL] and rows(text)[0][-2] != "*"  # only the session is marked
    assert rows(text)[0][6] == "6"  # KV blocks held


def test_later_frames_rate_the_tokens_generated_between_samples():
    text = frame(Sample(12.0, metrics(400, PROCS)), Sample(10.0, metrics(100, PROCS)), clock=lambda: 0.0)
    assert "tok/s: 150.0" in text.splitlines()[0]


def test_top_without_a_terminal_prints_the_asked_number_of_frames_one_after_another():
    calls = []

    def fetch():
        calls.append(1)
        return metrics(100 * len(calls), PROCS)

    now = [0.0]

    def sleep(s):  # a fake clock: sleeping only moves it
        now[0] += s

    out = io.StringIO()
    run_top(fetch, 2, 2.0, out, clock=lambda: now[0], sleep=sleep)
    text = out.getvalue()
    assert len(calls) == 3 and text.count("llmos top - ") == 2 and "\x1b[" not in text
    frames = text.split("\n\n", 1)
    assert "tok/s: 200.0" in frames[0].splitlines()[0]  # 100 tokens in the 0.5 s before the first frame
    assert "tok/s: 50.0" in text.split("llmos top - ")[2].splitlines()[0]  # then 100 in the 2 s delay


def test_an_empty_kernel_still_draws_a_frame():
    text = frame(Sample(0.0, {"processes": [], "models": [], "counts": {}, "finished": {}}), clock=lambda: 0.0)
    assert "processes: none" in text and "(no model loaded)" in text and rows(text) == []


def test_ps_shows_a_long_owner_whole_and_cuts_only_past_the_widest_column_with_a_plus():
    """Real account names (llmos-x-alice) were cut to 10 characters, so two users could look alike."""
    from llmos.top import OWNER_MAX, format_ps
    from llmos.types import ProcessInfo

    rows = [ProcessInfo(pid=1, state="READY", priority=0, model="m", owner="llmos-x-alice"),
            ProcessInfo(pid=2, state="READY", priority=0, model="m", owner="x" * (OWNER_MAX + 8))]
    table = format_ps(rows).splitlines()
    assert "llmos-x-alice " in table[1]
    assert "x" * (OWNER_MAX - 1) + "+" in table[2] and "x" * OWNER_MAX not in table[2]
    assert len({len(line.split(" m")[0]) for line in table[1:]}) == 1  # the columns line up
