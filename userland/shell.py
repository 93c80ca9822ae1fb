"""``llmos-shell``: an interactive REPL over one LLMOS connection (prompt_toolkit line editing, history).

Ctrl-C while a generation streams sends it TERM and returns to the prompt; the shell stays.
With stdin not a terminal it reads commands line by line, so scripts can drive it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Callable, TextIO

from llmos.cli import format_ps
from llmos.llmos import LLMOS
from llmos.syscalls.address import llmos_home
from llmos.syscalls.errors import LLMOSError

HELP = """commands:
  run [--model M] [-n N] [--priority P] [--temperature T] [--seed S] [--chat] [--ignore-eos] PROMPT
                      generate, streaming the text (Ctrl-C stops it)
  spawn [same options] PROMPT
                      start a generation in the background; prints its pid
  ps                  list processes
  kill PID [SIGNAL]   send TERM (default) or KILL
  wait PID            wait for a process and print its output
  stat PID            a process's record and stats
  status              the kernel's pid, address, uptime and models
  help                this text
  exit                leave the shell (also Ctrl-D)"""


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # never exit the shell on a typo
        raise _ArgError(message)


def _run_parser(name: str) -> _Parser:
    p = _Parser(prog=name, add_help=False)
    p.add_argument("--model", default=None)
    p.add_argument("-n", "--max-new-tokens", type=int, default=128)
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("prompt", nargs="+")
    return p


class Shell:
    def __init__(self, os_: LLMOS, out: TextIO = sys.stdout) -> None:
        self.os = os_
        self.out = out
        self.commands: dict[str, Callable[[list[str]], None]] = {
            "run": self.do_run, "spawn": self.do_spawn, "ps": self.do_ps, "kill": self.do_kill,
            "wait": self.do_wait, "stat": self.do_stat, "status": self.do_status, "help": self.do_help,
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
            fn(rest)
        except KeyboardInterrupt:  # Ctrl-C outside a stream (a model still loading): back to the prompt
            self.say("\n[interrupted]")
        except _ArgError as exc:
            self.say(f"usage error: {exc}")
        except (ValueError, IndexError) as exc:
            self.say(f"usage error: {exc}; type help")
        except LLMOSError as exc:
            self.say(f"error: {exc}")
        return True

    def _spawn(self, name: str, rest: list[str]) -> int:
        a = _run_parser(name).parse_args(rest)
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

    def do_run(self, rest: list[str]) -> None:
        pid = self._spawn("run", rest)
        stream = self.os.stream(pid)
        try:
            for text in stream:
                self.say(text, end="")
        except KeyboardInterrupt:
            stream.close()
            self.os.kill(pid, "TERM")
            self.say(f"\n[pid {pid} terminated]")
            return
        self.say()
        self.os.wait(pid, timeout=30)
        if stream.result and stream.result.finish_reason == "error":
            self.say(f"[pid {pid} failed: {(stream.result.error or {}).get('message', '')}]")

    def do_spawn(self, rest: list[str]) -> None:
        self.say(f"pid {self._spawn('spawn', rest)}")

    def do_ps(self, rest: list[str]) -> None:
        self.say(format_ps(self.os.ps()))

    def do_kill(self, rest: list[str]) -> None:
        sig = rest[1].upper().removeprefix("SIG") if len(rest) > 1 else "TERM"
        self.say(f"pid {rest[0]}: {self.os.kill(int(rest[0]), sig)}")

    def do_wait(self, rest: list[str]) -> None:
        r = self.os.wait(int(rest[0]))
        self.say(r.text)
        self.say(f"[pid {r.pid}: {r.finish_reason}, {r.stats.output_tokens} tokens]")

    def do_stat(self, rest: list[str]) -> None:
        info = self.os.client.stat(int(rest[0]))
        for k, v in info.__dict__.items():
            self.say(f"{k:>14}: {v}")

    def do_status(self, rest: list[str]) -> None:
        info = self.os.client.kernel_info()
        self.say(f"kernel {info['version']} pid {info['pid']} at {info['address']}, up {info['uptime_s']:.0f} s")
        for m in info["models"]:
            self.say(f"  {m['model']}: worker {m['worker_pid']} on {m['device']}, running {m['running']}")

    def do_help(self, rest: list[str]) -> None:
        self.say(HELP)


def _interactive(shell: Shell) -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory

    home = llmos_home()
    home.mkdir(parents=True, exist_ok=True)
    session: PromptSession = PromptSession(history=FileHistory(str(home / "shell_history")))
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
    ap = argparse.ArgumentParser(prog="llmos-shell", description=__doc__.splitlines()[0])
    ap.add_argument("--address", default=None)
    ap.add_argument("--model", default=None, help="default model for run/spawn")
    args = ap.parse_args(argv)
    try:
        os_ = LLMOS(model_path=args.model, address=args.address)
    except LLMOSError as exc:
        print(f"llmos-shell: {exc}", file=sys.stderr)
        return 1
    shell = Shell(os_)
    try:
        if sys.stdin.isatty():
            shell.say("llmos shell; type help")
            _interactive(shell)
        else:
            for line in sys.stdin:
                if not shell.execute(line):
                    break
    finally:
        os_.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
