"""llmos-shell: an interactive REPL over one LLMOS connection (prompt_toolkit line editing, history).

Ctrl-C while a generation streams stops it (TERM), collects it and returns to the prompt; the
shell stays. With stdin not a terminal it reads commands line by line, so scripts can drive it.
A command with bad arguments prints its usage; a bug prints one line (LLMOS_DEBUG=1: the traceback).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from llmos._args import signal_name, syscall_arg
from llmos.chat import chat_loop
from llmos.cli import EXIT_SIGPIPE, end, internal_error, nice_message, outcome, quiet_stdout, reap, send_signal
from llmos.kernel.config import home_dir
from llmos.llmos import LLMOS
from llmos.syscalls.address import llmos_home
from llmos.syscalls.errors import InvalidArgument, LLMOSError
from llmos.top import Sample, format_ps, frame

HELP = """commands:
  run [--model M] [-n N] [--priority P] [--temperature T] [--seed S] [--chat] [--ignore-eos] PROMPT
                      generate, streaming the text (Ctrl-C stops it); temperature 0.8 by default,
                      --temperature 0 repeats a run exactly
  spawn [same options] PROMPT
                      start a generation in the background; prints its pid
  chat [MODEL] [--system S] [-n N] [--temperature T]
                      a conversation: each line is a turn (the context is kept); an empty
                      line or /exit leaves it
  ps                  list processes (NI: nice value, KV: blocks held, S: * a session)
  top                 one frame of top: processes, batch, KV use, tok/s
  kill PID [TERM|KILL|STOP|CONT]
                      send TERM (default: stops after the current step, keeps the output),
                      KILL, STOP (suspend: out of the batch, context kept) or CONT (resume)
  stop PID            suspend a process (kill PID STOP)
  cont PID            resume a stopped process (kill PID CONT)
  nice PID N          set a live process's nice value (-20..19, lower first; below 0 only root)
  wait PID            wait for a process and print its output
  stat PID            a process's record and stats
  status              the kernel's pid, address, uptime and models
  ls [PATH]           list a directory of the namespace (default /: /models, /data, /proc, /home, /var)
  cat PATH            print a file of the namespace (text; binary bytes shown escaped)
  dmesg [-n N]        the kernel's last log lines (default 20)
  help                this text
  exit                leave the shell (also Ctrl-D)"""


class _ArgError(Exception):
    """A command line the command's parser refused; the message carries the command's usage."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # never exit the shell on a typo
        raise _ArgError(f"{self.format_usage().strip()} ({message})")


def _parser(name: str, *args: tuple[str, dict]) -> _Parser:
    p = _Parser(prog=name, add_help=False)
    for flag, opts in args:
        p.add_argument(flag, **opts)
    return p


_PID = ("pid", {"type": syscall_arg("kill", "pid"), "metavar": "PID"})  # every pid field is the table's PID


def _run_parser(name: str) -> _Parser:
    p = _Parser(prog=name, add_help=False)
    p.add_argument("--model", default=None)
    p.add_argument("-n", "--max-new-tokens", type=syscall_arg("spawn", "max_new_tokens"), default=128)
    p.add_argument("--priority", type=syscall_arg("spawn", "priority"), default=0)
    p.add_argument("--temperature", type=syscall_arg("spawn", "temperature"), default=None)
    p.add_argument("--seed", type=syscall_arg("spawn", "seed"), default=None)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("prompt", nargs="+", metavar="PROMPT")
    return p


PARSERS: dict[str, Callable[[], _Parser]] = {
    "run": lambda: _run_parser("run"),
    "spawn": lambda: _run_parser("spawn"),
    "ps": lambda: _parser("ps"),
    "kill": lambda: _parser("kill", _PID, ("signal", {"nargs": "?", "default": "TERM", "type": signal_name,
                                                      "metavar": "TERM|KILL|STOP|CONT"})),
    "stop": lambda: _parser("stop", _PID),
    "cont": lambda: _parser("cont", _PID),
    "nice": lambda: _parser("nice", _PID, ("priority", {"type": syscall_arg("nice", "priority"), "metavar": "N"})),
    "top": lambda: _parser("top"),
    "chat": lambda: _parser("chat", ("model", {"nargs": "?", "default": None, "metavar": "MODEL"}),
                            ("--system", {"default": None, "metavar": "S"}),
                            ("-n", {"dest": "max_new_tokens", "type": syscall_arg("spawn", "max_new_tokens"),
                                    "default": 128, "metavar": "N"}),
                            ("--temperature", {"type": syscall_arg("spawn", "temperature"), "default": None,
                                               "metavar": "T"})),
    "wait": lambda: _parser("wait", _PID),
    "stat": lambda: _parser("stat", _PID),
    "status": lambda: _parser("status"),
    "ls": lambda: _parser("ls", ("path", {"nargs": "?", "default": "/", "metavar": "PATH"}),
                          ("--limit", {"type": syscall_arg("fs_list", "limit"), "default": 1000})),
    "cat": lambda: _parser("cat", ("path", {"metavar": "PATH"})),
    "dmesg": lambda: _parser("dmesg", ("-n", {"dest": "n", "type": syscall_arg("dmesg", "n"), "default": 20,
                                              "metavar": "N"})),
    "help": lambda: _parser("help"),
}


def read_stdin(prompt: str) -> str | None:
    """A line from stdin (not a terminal: no prompt is shown); None at end of input."""
    return sys.stdin.readline() or None


class Shell:
    """The shell's commands over one LLMOS handle. ``read_line(prompt)`` gives the next input line (None at
    its end): the chat sub-mode reads its turns from it."""

    def __init__(self, os_: LLMOS, out: TextIO | None = None, home: Path | None = None,
                 read_line: Callable[[str], str | None] = read_stdin) -> None:
        self.os = os_
        self.out = out or sys.stdout
        self.home = home or llmos_home()
        self.read_line = read_line
        self.commands: dict[str, Callable[[argparse.Namespace], None]] = {
            "run": self.do_run, "spawn": self.do_spawn, "ps": self.do_ps, "kill": self.do_kill,
            "wait": self.do_wait, "stat": self.do_stat, "status": self.do_status, "help": self.do_help,
            "stop": self.do_stop, "cont": self.do_cont, "nice": self.do_nice, "top": self.do_top,
            "chat": self.do_chat, "ls": self.do_ls, "cat": self.do_cat, "dmesg": self.do_dmesg,
        }

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def execute(self, line: str) -> bool:
        """Run one command line; False means the user asked to leave."""
        try:
            words = shlex.split(line)
        except ValueError as exc:
            self.say(f"error: {exc}")
            return True
        if not words:
            return True
        cmd, rest = words[0], words[1:]
        if cmd in ("exit", "quit"):
            return False
        fn = self.commands.get(cmd)
        if fn is None:
            self.say(f"unknown command {cmd!r}; type help")
            return True
        try:
            fn(PARSERS[cmd]().parse_args(rest))
        except KeyboardInterrupt:  # Ctrl-C outside a stream (a model still loading): back to the prompt
            self.say("\n[interrupted]")
        except _ArgError as exc:
            self.say(str(exc))
        except LLMOSError as exc:
            self.say(f"error: {exc}")
        except BrokenPipeError:
            raise
        except Exception as exc:  # a bug in one command: one line, and the shell stays
            internal_error("llmos-shell", exc, self.home)
        return True

    def _spawn(self, a: argparse.Namespace) -> int:
        params = {"max_new_tokens": a.max_new_tokens, "priority": a.priority}
        if a.temperature is not None:
            params["temperature"] = a.temperature
        if a.seed is not None:
            params["seed"] = a.seed
        if a.ignore_eos:
            params["ignore_eos"] = True
        text = " ".join(a.prompt)
        if a.chat:
            return self.os.spawn(messages=[{"role": "user", "content": text}], model=a.model, **params)
        return self.os.spawn(prompt=text, model=a.model, **params)

    def do_run(self, a: argparse.Namespace) -> None:
        pid = self._spawn(a)
        stream = self.os.stream(pid)
        try:
            for text in stream:
                self.say(text, end="")
        except KeyboardInterrupt:
            stream.close()
            end(self.os.client, pid)  # ours: stop it and collect it, so no ZOMBIE is left behind
            self.say(f"\n[pid {pid} stopped by Ctrl-C]")
            return
        except BrokenPipeError:  # nobody reads the output any more: stop generating it
            stream.close()
            end(self.os.client, pid)
            raise
        self.say()
        reap(self.os.client, pid)  # the result came with the stream's final frame
        said = outcome(stream.result) if stream.result else None
        if said:
            self.say(said)

    def do_spawn(self, a: argparse.Namespace) -> None:
        self.say(f"pid {self._spawn(a)}")

    def do_ps(self, a: argparse.Namespace) -> None:
        self.say(format_ps(self.os.ps()))

    def do_kill(self, a: argparse.Namespace) -> None:
        self.say(send_signal(self.os.client, a.pid, a.signal)[0].replace("`llmos ", "`"))

    def do_stop(self, a: argparse.Namespace) -> None:
        self.say(send_signal(self.os.client, a.pid, "STOP")[0].replace("`llmos ", "`"))

    def do_cont(self, a: argparse.Namespace) -> None:
        self.say(send_signal(self.os.client, a.pid, "CONT")[0].replace("`llmos ", "`"))

    def do_nice(self, a: argparse.Namespace) -> None:
        self.say(nice_message(a.pid, self.os.nice(a.pid, a.priority)))

    def do_top(self, a: argparse.Namespace) -> None:
        self.say(frame(Sample(time.monotonic(), self.os.client.metrics())))

    def do_chat(self, a: argparse.Namespace) -> None:
        sampling = {"max_new_tokens": a.max_new_tokens}
        if a.temperature is not None:
            sampling["temperature"] = a.temperature
        with self.os.session(a.model, a.system, **sampling) as s:
            self.say(f"[chat with session pid {s.pid}: an empty line or /exit leaves]")
            try:
                turns = chat_loop(s, lambda: self.read_line("chat> "), lambda t: self.say(t, end=""),
                                  empty_ends=True)
            except KeyboardInterrupt:  # Ctrl-C during a reply: leave the chat, the session is closed
                self.say("\n[chat interrupted]")
                return
        self.say(f"[chat ended after {turns} turns; session {s.pid} closed]")

    def do_wait(self, a: argparse.Namespace) -> None:
        r = self.os.wait(a.pid)
        self.say(r.text)
        self.say(outcome(r) or f"[pid {r.pid}: {r.finish_reason}, {r.stats.output_tokens} tokens]")

    def do_stat(self, a: argparse.Namespace) -> None:
        info = self.os.client.stat(a.pid)
        for k, v in info.__dict__.items():
            self.say(f"{k:>14}: {v}")

    def do_status(self, a: argparse.Namespace) -> None:
        info = self.os.client.kernel_info()
        self.say(f"kernel {info['version']} pid {info['pid']} at {info['address']}, up {info['uptime_s']:.0f} s")
        for m in info["models"]:
            self.say(f"  {m['model']}: worker {m['worker_pid']} on {m['device']}, running {m['running']}")

    def do_ls(self, a: argparse.Namespace) -> None:
        from llmos.cli_fs import format_ls

        from llmos.cli_fs import truncated_note

        entries = self.os.fs.ls(a.path, a.limit)
        self.say(format_ls(entries) if entries else f"{a.path}: empty")
        if entries.truncated:
            self.say(truncated_note(len(entries)))

    def do_cat(self, a: argparse.Namespace) -> None:
        import codecs

        text = codecs.getincrementaldecoder("utf-8")("backslashreplace")  # a piece may end mid-character
        try:
            with self.os.fs.open(a.path) as reader:
                for piece in reader:
                    self.say(text.decode(piece), end="")
        except InvalidArgument as exc:  # the kernel names its syscall; the shell's command for it is ls
            raise InvalidArgument(exc.message.replace("list it with fs_list", "list it with ls"), exc.errno) from None
        self.say(text.decode(b"", final=True))

    def do_dmesg(self, a: argparse.Namespace) -> None:
        from llmos.cli_fs import format_log_line

        for line in self.os.client.dmesg(n=a.n):
            self.say(format_log_line(line))

    def do_help(self, a: argparse.Namespace) -> None:
        self.say(HELP)


def history_file(home: Path) -> Path:
    """The shell's history (it holds prompts): created owner-only, and made so if an older LLMOS left it 0644."""
    if not home.is_dir():
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(home, 0o700)
    path = home / "shell_history"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    return path


def _interactive(shell: Shell, home: Path) -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory

    session: PromptSession = PromptSession(history=FileHistory(str(history_file(home))))

    def read_line(prompt: str) -> str | None:  # the chat sub-mode's lines: Ctrl-C or Ctrl-D leaves it
        try:
            return session.prompt(prompt)
        except (KeyboardInterrupt, EOFError):
            return None

    shell.read_line = read_line
    while True:
        try:
            line = session.prompt("llmos> ")
        except KeyboardInterrupt:
            continue  # Ctrl-C at the prompt clears the line
        except EOFError:
            return
        if not shell.execute(line):
            return


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llmos-shell", description=__doc__.splitlines()[0].split(": ", 1)[1])
    ap.add_argument("--address", default=None, help="kernel bus address (default: the default under --home, "
                                                    "else $LLMOS_ADDRESS, else ipc under $LLMOS_HOME/run)")
    ap.add_argument("--home", type=home_dir, default=None, help="state directory (default: $LLMOS_HOME or ~/.llmos)")
    ap.add_argument("--model", default=None, help="default model for run/spawn")
    args = ap.parse_args(argv)
    home = Path(args.home).expanduser().resolve() if args.home else llmos_home()
    try:
        os_ = LLMOS(model_path=args.model, address=args.address, home=args.home)
    except LLMOSError as exc:
        print(f"llmos-shell: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        return internal_error("llmos-shell", exc, home)
    shell = Shell(os_, home=home)
    try:
        if sys.stdin.isatty():
            shell.say("llmos shell; type help")
            _interactive(shell, home)
        else:
            while True:  # readline, not iteration: the chat sub-mode reads its turns from the same stdin
                line = sys.stdin.readline()
                if not line or not shell.execute(line):
                    break
    except BrokenPipeError:
        quiet_stdout()
        return EXIT_SIGPIPE
    except Exception as exc:  # the last resort: a bug, not the user's fault
        return internal_error("llmos-shell", exc, home)
    finally:
        os_.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
