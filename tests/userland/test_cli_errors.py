"""A user never sees a Python traceback from llmos or llmos-shell: bugs are one line, usage errors say the usage."""

import io

import pytest

import llmos.cli as cli
from llmos.cli import exit_status, kill_message, main, outcome
from llmos.shell import Shell
from llmos.types import ProcessResult, Stats


def boom(args):
    raise RuntimeError("boom")


def test_an_internal_error_is_one_line_saying_where_to_look_and_the_traceback_needs_llmos_debug(
        monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
    monkeypatch.delenv("LLMOS_ADDRESS", raising=False)
    monkeypatch.delenv("LLMOS_DEBUG", raising=False)
    monkeypatch.setattr(cli, "cmd_ps", boom)
    assert main(["ps"]) == 70
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmos: internal error: RuntimeError: boom")
    assert "LLMOS_DEBUG=1" in err and f"{tmp_path}/log/kernel.log" in err and "Traceback" not in err
    monkeypatch.setenv("LLMOS_DEBUG", "1")
    assert main(["ps"]) == 70
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: boom" in err


def test_a_file_the_user_named_that_cannot_be_used_is_a_message(monkeypatch, capsys, tmp_path):
    (tmp_path / "file").write_text("")
    assert main(["--home", str(tmp_path / "file"), "kernel", "start"]) == 2
    assert capsys.readouterr().err.strip() == f"llmos: the home {tmp_path / 'file'} is not a directory"


class Dummy:
    """Stands in for the LLMOS handle: these commands fail before reaching a kernel, or by a bug."""

    client = None

    def ps(self):
        raise KeyError("bug")


def test_the_shell_answers_bad_arguments_with_the_usage_and_survives_a_bug(capsys):
    out = io.StringIO()
    shell = Shell(Dummy(), out)
    for line in ("kill", "kill abc", "kill 4 HUP", "wait", "wait 1 2", "stat -3", "run", "spawn --temperature x hi",
                 "status now", "help me", "ps", 'run "unclosed'):
        assert shell.execute(line) is True
    text = out.getvalue()
    assert text.count("usage: kill PID [TERM|KILL]") == 3 and "PID must be a number, got 'abc'" in text
    assert "must be one of TERM, KILL, got 'HUP'" in text and text.count("usage: wait PID") == 2
    assert "usage: stat PID" in text and "usage: run " in text and "usage: spawn " in text
    assert "usage: status" in text and "usage: help" in text and "error: No closing quotation" in text
    err = capsys.readouterr().err
    assert err.startswith("llmos-shell: internal error: KeyError") and "Traceback" not in err + text
    assert shell.execute("exit") is False


def result(reason, sig=None, error=None):
    return ProcessResult(pid=9, text="t", token_ids=[], finish_reason=reason, stats=Stats(), signal=sig, error=error)


def test_a_process_ends_as_an_exit_status_the_shell_convention_knows():
    assert exit_status(result("length")) == 0 and exit_status(result("stop")) == 0
    assert exit_status(result("killed", "TERM")) == 143 and exit_status(result("killed", "KILL")) == 137
    assert exit_status(result("error", error={"message": "m"})) == 1
    assert outcome(result("killed", "KILL")) == "[pid 9 killed by SIGKILL]" and outcome(result("length")) is None
    assert outcome(result("error", error={"message": "worker died"})) == "[pid 9 failed: worker died]"


def test_kill_says_which_signal_was_sent_what_happens_next_and_how_to_collect_it():
    assert kill_message(4, "TERM", "RUNNING") == ("sent TERM to pid 4: it stops after its current step, keeping its "
                                                   "output; `llmos wait 4` collects it")
    assert kill_message(4, "TERM", "ZOMBIE").startswith("sent TERM to pid 4: it has ended, keeping its output")
    assert kill_message(4, "KILL", "ZOMBIE") == "sent KILL to pid 4: it has ended at once; `llmos wait 4` collects it"


def test_the_shell_help_and_llmos_shell_help_are_plain_text(capsys):
    from llmos.shell import main as shell_main

    with pytest.raises(SystemExit) as exc:
        shell_main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and "usage: llmos-shell" in out


def test_broken_pipe_and_ctrl_c_become_their_exit_codes(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))

    def pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "quiet_stdout", lambda: None)  # pytest's stdout is not a file descriptor to replace
    monkeypatch.setattr(cli, "cmd_ps", pipe)
    assert main(["ps"]) == 141 and "Error" not in capsys.readouterr().err
    monkeypatch.setattr(cli, "cmd_ps", interrupt)
    assert main(["ps"]) == 130
