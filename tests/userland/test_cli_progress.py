"""Progress for people (llmos/progress.py): the stages a spawn goes through, and a spinner and bars drawn only on
a terminal, the spinner erased when it stops."""

import io
import os
import select

import pytest

from llmos.progress import Spinner, Stages, model_stage, process_stage, progress_bar


def test_a_spawn_waits_for_its_model_to_load_then_in_the_queue_then_for_its_prefill():
    loading = {"model": "/m/tiny", "loaded": True, "executors": [{"ready": False, "stage": "reading weights"}]}
    assert model_stage(loading) == "loading model tiny: reading weights"
    assert model_stage({"model": "store:/models/qwen", "loaded": False}) == "loading model qwen"
    assert model_stage({"model": "/m/tiny", "loaded": True, "executors": [{"ready": True}]}) == "starting the process"
    assert model_stage({"model": "/m/tiny", "loaded": True, "executors": [{"ready": True}]}, ready="ready") == "ready"
    assert process_stage("READY") == process_stage("NEW") == "waiting in queue"
    assert process_stage("RUNNING", prompt_tokens=12) == "prefill (12 prompt tokens)"
    assert process_stage("STOPPED", pid=7) == "stopped (llmos cont 7 resumes it)"


class FakeKernel:
    """The two calls Stages makes, answering as a kernel would at each point of a spawn."""

    def __init__(self):
        self.calls, self.closed = [], False

    def model_info(self, model):
        self.calls.append(("model_info", model))
        return {"model": model, "loaded": False}

    def stat(self, pid):
        from llmos.types import ProcessInfo

        self.calls.append(("stat", pid))
        return ProcessInfo(pid=pid, state="RUNNING", priority=0, model="m", prompt_tokens=3)

    def close(self):
        self.closed = True


def test_stages_ask_nothing_before_the_spawn_then_the_model_then_the_process_on_one_connection():
    kernel = FakeKernel()
    opened = []
    stages = Stages(lambda: opened.append(kernel) or kernel, "/m/tiny")
    assert stages() is None and opened == []  # still connecting: nothing to ask, no connection made
    stages.spawning = True
    assert stages() == "loading model tiny"
    stages.pid = 4
    assert stages() == "prefill (3 prompt tokens)"
    stages.close()
    assert kernel.calls == [("model_info", "/m/tiny"), ("stat", 4)] and len(opened) == 1 and kernel.closed


def test_piped_neither_the_spinner_nor_the_bar_draws_anything_nor_asks_the_kernel():
    out = io.StringIO()
    asked = []
    with Spinner("connecting", poll=lambda: asked.append(1) or "x", stream=out) as s:
        s.stage("loading")
        s.print("[pid 3]")
    with progress_bar("import", stream=out) as update:
        update(5, 10)
    assert out.getvalue() == "[pid 3]\n" and asked == []


@pytest.fixture
def tty():
    """A pseudo-terminal: the end a program writes to (a text stream) and a reader of what it wrote."""
    main_fd, sub_fd = os.openpty()
    stream = os.fdopen(sub_fd, "w", encoding="utf-8")

    def read(wait_s: float = 0.1) -> str:
        """What was written so far, waiting up to wait_s for the first byte."""
        stream.flush()
        chunks = []
        while select.select([main_fd], [], [], wait_s if not chunks else 0)[0]:
            chunks.append(os.read(main_fd, 65536))
        return b"".join(chunks).decode("utf-8", "replace")

    yield stream, read
    stream.close()
    os.close(main_fd)


def test_on_a_terminal_the_spinner_shows_the_stage_the_poll_reports_and_erases_its_line_when_stopped(tty):
    import time

    stream, read = tty
    s = Spinner("connecting", poll=lambda: "waiting in queue", stream=stream).start()
    shown, deadline = "", time.monotonic() + 10
    while "waiting in queue" not in shown and time.monotonic() < deadline:  # the spinner's thread looks every POLL_S
        shown += read()
    s.stage("prefill")  # the caller's word shows at once
    s.stop()
    shown += read()
    assert "connecting (0 s)" in shown and "waiting in queue" in shown and "prefill" in shown
    # the last thing written erases the spinner's line: the next text starts on a clean one
    last = shown.rsplit("prefill", 1)[1]
    assert "\x1b[2K" in last and "prefill" not in last


def test_on_a_terminal_the_bar_draws_its_count(tty):
    stream, read = tty
    with progress_bar("eval m on d", unit="records", stream=stream) as update:
        update(3, 4)
    assert "eval m on d" in read()


def test_a_load_counts_its_stages_over_every_instance_and_says_the_current_one():
    from llmos.progress import load_progress

    info = {"model": "/m/tiny", "loaded": True,
            "executors": [{"ready": False, "stage": "reading weights"}, {"ready": True}]}
    assert load_progress(info) == (2 + 4, 8, "loading model tiny: reading weights")
    assert load_progress({"model": "/m/tiny", "loaded": False}) is None  # not in the model table yet: pulse
    assert load_progress({"model": "/m/tiny", "loaded": True, "executors": [{"ready": True}]})[:2] == (4, 4)


def test_a_load_bar_piped_draws_nothing_and_never_asks_the_kernel():
    import io

    from llmos.progress import LoadBar

    asked = []
    out = io.StringIO()
    with LoadBar("loading model x", poll=lambda: asked.append(1), stream=out):
        pass
    assert out.getvalue() == "" and asked == []


def test_a_load_bar_on_a_terminal_shows_the_stages_done_and_the_current_one_then_erases_itself():
    import io
    import time

    from llmos.progress import LoadBar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    asked = []

    def poll():
        asked.append(1)
        return 1, 4, "loading model x: reading weights"

    with LoadBar("loading model x", poll=poll, stream=out):
        deadline = time.monotonic() + 10
        while "reading weights" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
    shown = out.getvalue()
    assert asked and "loading model x: reading weights" in shown and "1/4" in shown and "stages" in shown
