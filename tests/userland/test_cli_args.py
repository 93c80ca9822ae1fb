"""The new commands' arguments: how they parse, and that every new flag says what it does."""

import argparse

import pytest

from llmos.cli import build_parser, kill_message

NEW = ("nice", "stop", "cont", "top", "chat", "run", "kill")


def subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("name", NEW)
def test_every_flag_of_the_new_commands_has_help_text(name):
    missing = [a.dest for a in subparser(name)._actions if not a.help]
    assert missing == [], f"llmos {name}: no help for {missing}"


def test_kill_takes_the_signal_as_an_option_or_a_word_and_stop_cont_nice_parse():
    p = build_parser()
    assert p.parse_args(["kill", "-s", "stop", "5"]).sig == "STOP"
    assert p.parse_args(["kill", "5", "SIGCONT"]).signal == "CONT"
    assert p.parse_args(["nice", "5", "-3"]).priority == -3  # a negative nice is a value, not a flag
    assert p.parse_args(["stop", "5"]).pid == 5 and p.parse_args(["cont", "5"]).pid == 5
    a = p.parse_args(["top", "-n", "1", "-d", "0.5"])
    assert (a.iterations, a.delay) == (1, 0.5)
    r = p.parse_args(["run", "-p", "4", "--deadline", "2.5", "--queue-timeout", "1", "hi"])
    assert (r.priority, r.deadline, r.queue_timeout) == (4, 2.5, 1.0)
    c = p.parse_args(["chat", "--system", "Be brief.", "--temperature", "0"])
    assert c.system == "Be brief." and c.temperature == 0.0


@pytest.mark.parametrize("argv", [["nice", "5", "20"], ["nice", "5", "x"], ["top", "-n", "0"],
                                  ["run", "--deadline", "0", "hi"], ["kill", "-s", "HUP", "5"]])
def test_values_the_kernel_would_refuse_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_stop_and_cont_say_what_happened_and_how_to_undo_it():
    assert kill_message(4, "STOP", "STOPPED", "RUNNING") == ("sent STOP to pid 4: it is STOPPED, out of the batch "
                                                             "with its context kept; `llmos cont 4` resumes it")
    assert kill_message(4, "CONT", "READY", "STOPPED") == "sent CONT to pid 4: it is READY, resuming where it stopped"


@pytest.mark.parametrize("sig,state,before,said", [
    ("CONT", "RUNNING", "RUNNING", "pid 4 was not stopped; it is RUNNING"),
    ("CONT", "READY", "READY", "pid 4 was not stopped; it is READY"),
    ("CONT", "BLOCKED", None, "sent CONT to pid 4: it is BLOCKED"),  # the state before unknown: no claim
    ("STOP", "STOPPED", "STOPPED", "pid 4 was already STOPPED; `llmos cont 4` resumes it"),
    ("STOP", "ZOMBIE", "ZOMBIE", "pid 4 has already ended (ZOMBIE): nothing to STOP; `llmos wait 4` collects it"),
    ("STOP", "ZOMBIE", "RUNNING", "pid 4 has already ended (ZOMBIE): nothing to STOP; `llmos wait 4` collects it"),
    ("CONT", "ZOMBIE", None, "pid 4 has already ended (ZOMBIE): nothing to CONT; `llmos wait 4` collects it"),
    ("TERM", "ZOMBIE", "ZOMBIE", "pid 4 has already ended (ZOMBIE): nothing to TERM; `llmos wait 4` collects it"),
])
def test_stop_and_cont_claim_only_what_the_states_show(sig, state, before, said):
    assert kill_message(4, sig, state, before) == said


# Every subcommand that takes a pid or a timeout: a value the kernel would refuse (the table's PID is >= 1, a
# timeout >= 0) or one no frame can carry (past 64 bits) is a usage error naming the argument, before anything
# is sent (cli.md: "a bad value exits 2 before anything is sent").
BAD_PID_OR_TIMEOUT = [
    (["stop", "0"], "argument pid: must be >= 1"),
    (["cont", "99999999999999999999999"], "argument pid: must be <= 9223372036854775807"),
    (["nice", "0", "3"], "argument pid: must be >= 1"),
    (["wait", "1", "--timeout", "-1"], "argument --timeout: must be >= 0"),
    (["wait", "1", "--timeout", "inf"], "argument --timeout: must be finite"),
    (["wait", "-5"], "argument pid: must be >= 1"),
    (["stat", "0"], "argument pid: must be >= 1"),
    (["kill", "0"], "argument pid: must be >= 1"),
    (["kill", "-s", "STOP", "99999999999999999999999"], "argument pid: must be <= 9223372036854775807"),
    (["kill", "x"], "argument pid: must be an integer, got 'x'"),
]


@pytest.mark.parametrize("argv,said", BAD_PID_OR_TIMEOUT, ids=[" ".join(a) for a, _ in BAD_PID_OR_TIMEOUT])
def test_a_bad_pid_or_timeout_exits_2_naming_the_argument(argv, said, capsys):
    from llmos.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--home", "/nonexistent-llmos-home", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and said in err and f"usage: llmos {argv[0]}" in err, err


def test_every_pid_and_timeout_argument_takes_its_type_from_the_syscall_table():
    for name, sub in next(a for a in build_parser()._actions
                          if isinstance(a, argparse._SubParsersAction)).choices.items():
        for action in sub._actions:
            if action.dest in ("pid", "timeout"):
                assert action.type is not int and action.type is not float, f"llmos {name} {action.dest}"


def test_every_argument_of_every_command_has_help_text():
    """`llmos X --help` explains every flag and argument (issue 11: most flags had none)."""
    import argparse

    from llmos.cli import build_parser

    missing, seen = [], set()

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if id(sub) not in seen:
                        seen.add(id(sub))
                        walk(sub, [*path, name])
            elif not action.help and action.dest != "help":
                missing.append(f"{' '.join(path)} {action.option_strings or action.dest}")

    walk(build_parser(), ["llmos"])
    assert missing == [] and len(seen) > 30


def _walk(parser, path=("llmos",), seen=None):
    """(command path, parser) for every parser under ``parser``, each once."""
    seen = set() if seen is None else seen
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    yield from _walk(sub, (*path, name), seen)


def test_run_spawn_and_chat_take_every_sampling_field_of_spawn_and_send_what_was_given():
    from llmos._args import sampling_params
    from llmos.syscalls.table import SAMPLING

    argv = ["--max-new-tokens", "7", "--temperature", "0", "--top-p", "0.5", "--top-k", "3",
            "--repetition-penalty", "1.3", "--seed", "9", "--stop", "a", "--stop", "b", "--stop-token-id", "5",
            "--stop-token-id", "6", "--ignore-eos"]
    want = {"max_new_tokens": 7, "temperature": 0.0, "top_p": 0.5, "top_k": 3, "repetition_penalty": 1.3, "seed": 9,
            "stop": ["a", "b"], "stop_token_ids": [5, 6], "ignore_eos": True}
    assert set(want) == {f.name for f in SAMPLING}  # a field added to the table needs its flag here too
    p = build_parser()
    for cmd, tail in (("run", ["hi"]), ("spawn", ["hi"]), ("chat", [])):
        assert sampling_params(p.parse_args([cmd, *argv, *tail])) == want, cmd
    # what was not given is not sent: the kernel's defaults stand (max_new_tokens has the CLI's default, 128)
    assert sampling_params(p.parse_args(["run", "hi"])) == {"max_new_tokens": 128}


@pytest.mark.parametrize("argv", [["run", "--repetition-penalty", "0", "hi"], ["run", "--stop-token-id", "-1", "hi"],
                                  ["run", "--stop-token-id", "x", "hi"], ["spawn", "--top-p", "1.5", "hi"]])
def test_a_sampling_value_the_kernel_would_refuse_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2 and "argument --" in capsys.readouterr().err


# commands that print no data of their own: a file's bytes, screens, a server's log
NO_JSON = {"fs cat", "top", "serve"}


def test_every_command_that_prints_data_has_json():
    missing = []
    for path, parser in _walk(build_parser()):
        leaf = not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
        name = " ".join(path[1:])
        if leaf and parser.get_default("fn") is not None and name not in NO_JSON:
            if not any(a.dest == "json" for a in parser._actions):
                missing.append(name)
    assert missing == []


def test_every_optional_value_says_its_default_in_its_help():
    """`--help` shows each flag's default (issue 11): an option or optional argument that takes a value says
    "default" in its help text (a flag that is off unless given says nothing)."""
    missing = []
    for path, parser in _walk(build_parser()):
        for a in parser._actions:
            takes_value = a.nargs != 0 and not isinstance(a, (argparse._StoreTrueAction, argparse._HelpAction))
            optional = (a.option_strings and not a.required) or a.nargs in ("?", "*")
            flag = a.option_strings[-1] if a.option_strings else a.dest
            if takes_value and optional and "default" not in (a.help or ""):
                missing.append(f"{' '.join(path)} {flag}")
    assert missing == []
