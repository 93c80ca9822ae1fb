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
    for line in ("kill", "kill abc", "kill 4 HUP", "stop 99999999999999999999999", "wait", "wait 1 2", "stat -3",
                 "run", "spawn --temperature x hi", "status now", "help me", "ps", 'run "unclosed'):
        assert shell.execute(line) is True
    text = out.getvalue()
    assert text.count("usage: kill PID [TERM|KILL|STOP|CONT]") == 3 and "argument PID: must be an integer, got 'abc'" in text
    assert "must be one of TERM, KILL, STOP, CONT, got 'HUP'" in text and text.count("usage: wait PID") == 2
    assert "usage: stop PID" in text and "argument PID: must be <= 9223372036854775807" in text
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


class _InterruptedImport:
    """A meta path finder that raises KeyboardInterrupt for one module, as a Ctrl-C during its import does."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise KeyboardInterrupt
        return None


@pytest.mark.parametrize("entry, module", [("cli", "llmos.cli"), ("shell", "llmos.shell")])
def test_ctrl_c_while_the_command_is_still_importing_exits_130_without_a_traceback(monkeypatch, entry, module):
    import sys

    import llmos._main

    monkeypatch.delitem(sys.modules, module)
    monkeypatch.setattr(sys, "meta_path", [_InterruptedImport(module), *sys.meta_path])
    assert getattr(llmos._main, entry)() == 130


def test_the_console_scripts_enter_through_the_guarded_entry_points():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts") if e.name.startswith("llmos")}
    assert scripts == {"llmos": "llmos._main:cli", "llmos-shell": "llmos._main:shell"}


def test_home_and_address_go_before_or_after_the_subcommand_and_an_empty_home_is_refused(capsys):
    from pathlib import Path

    p = cli.build_parser()
    assert p.parse_args(["ps"]).home is None and p.parse_args(["ps"]).address is None
    assert p.parse_args(["--home", "/a", "ps"]).home == Path("/a")
    assert p.parse_args(["ps", "--home", "/b"]).home == Path("/b")
    assert p.parse_args(["--home", "/a", "ps", "--home", "/b"]).home == Path("/b")  # the later one wins
    assert p.parse_args(["kernel", "start", "--address", "tcp://127.0.0.1:5555"]).address == "tcp://127.0.0.1:5555"
    for argv in (["--home", "", "ps"], ["run", "--home", " ", "hi"], ["kernel", "start", "--home", ""]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and "--home: must be a directory path, got an empty string" in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["run", "--max-new-tokens", "99999999999999999999", "hi"], "--max-new-tokens: must be <= 1000000"),
    (["run", "--max-new-tokens", "0", "hi"], "--max-new-tokens: must be >= 1"),
    (["run", "--temperature", "-1", "hi"], "--temperature: must be >= 0.0"),
    (["run", "--top-p", "nan", "hi"], "--top-p: must be finite"),
    (["run", "--priority", "x", "hi"], "--priority: must be an integer"),
    (["load", "--kv-blocks", "1"], "--kv-blocks: must be >= 2"),
])
def test_numeric_options_are_checked_against_the_syscall_table_before_anything_is_sent(capsys, argv, says):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and says in capsys.readouterr().err
