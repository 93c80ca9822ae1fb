"""llmos-shell: an interactive REPL over one LLMOS connection (prompt_toolkit line editing, history).

Ctrl-C while a generation streams stops it (TERM), collects it and returns to the prompt; the
shell stays. With stdin not a terminal it reads commands line by line, so scripts can drive it.
A command with bad arguments prints its usage; a bug prints one line (LLMOS_DEBUG=1: the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Callable, Iterator, TextIO

from llmos._args import add_generation_flags, positive, sampling_params, signal_name, syscall_arg
from llmos.cli import EXIT_SIGPIPE, end, format_stat, internal_error, nice_message, outcome, quiet_stdout, reap, \
    send_signal
from llmos.cli_models import format_models
from llmos.kernel.config import home_dir
from llmos.llmos import LLMOS
from llmos.shell_chat import COMMANDS as CHAT_COMMANDS, SETTING_HELP, Chat, ChatSettings
from llmos.shell_complete import ChatCompleter, ShellCompleter
from llmos.shell_views import format_devices, format_metrics, printable, typed_name
from llmos.syscalls.address import llmos_home
from llmos.syscalls.errors import InvalidArgument, LLMOSError
from llmos.top import format_ps, run_top

HELP = """commands:
  run [--model M] [-n N] [-p P] [--temperature T] [--top-p P] [--top-k K] [--seed S] [--stop S]
      [--deadline S] [--chat] [--ignore-eos] PROMPT
                      generate, streaming the text (Ctrl-C stops it); temperature 0.8 by default,
                      --temperature 0 repeats a run exactly
  spawn [same options] PROMPT
                      start a generation in the background; prints its pid
  chat [MODEL] [--system S] [-n N] [--temperature T] [--top-p P] [--top-k K] [--seed S]
                      a conversation (a session): each message is a turn, its reply streams;
                      \"\"\" opens and closes a multi-line message; /set temperature 0.2,
                      /system ..., /clear, /show, /load MODEL, /? for help, /bye to leave
  ps                  list processes (NI: nice value, KV: blocks held, S: * a session)
  top [-n N] [-d S]   processes, batch, KV use, tok/s: refreshed every S seconds (default 2)
                      until Ctrl-C (N frames with -n; one when the shell reads a script)
  kill PID [TERM|KILL|STOP|CONT]
                      send TERM (default: stops after the current step, keeps the output),
                      KILL, STOP (suspend: out of the batch, context kept) or CONT (resume)
  stop PID            suspend a process (kill PID STOP)
  cont PID            resume a stopped process (kill PID CONT)
  nice PID N          set a live process's nice value (-20..19, lower first; below 0 only root)
  wait PID            wait for a process and print its output
  stat PID            a process's record and stats
  status              the kernel's pid, address, uptime and models
  models [--json]     the loaded models (instances, KV blocks, memory) and the store's
  load [MODEL] [--device D] [--instances N] [--keep-alive S] [--max-batch N] [--engine E]
       [--backend local|ray] [--num-cpus N] [--num-gpus N] [--placement spread|pack]
       [--dtype auto|float32|bfloat16|float16] [--no-prefix-cache]
                      load a model (default: the shipped default model; --backend ray: Ray actors)
  unload [MODEL] [--force]
                      unload a model (--force also ends its processes)
  devices [--json]    cpu and gpus: memory, what the models hold, load
  metrics [--json]    processes per state, latency percentiles (ms), per model: steps, batch, KV
  ls [PATH]           list a directory of the namespace (default /: /models, /data, /proc, /home, /var)
  cat PATH            print a file of the namespace (text; binary bytes shown escaped)
  dmesg [-n N]        the kernel's last log lines (default 20)
  help                this text
  exit                leave the shell (also Ctrl-D)
keys: Tab completes commands, pids, models and paths; Ctrl-R searches the history (Enter runs the
line found); Ctrl-C stops what runs, or clears the line"""

# what Tab shows beside each command
SUMMARY = {"run": "generate, streaming the text", "spawn": "start a generation in the background",
           "chat": "a conversation with a model", "ps": "list processes", "top": "processes, batch, KV, tok/s",
           "kill": "signal a process", "stop": "suspend a process", "cont": "resume a stopped process",
           "nice": "change a process's priority", "wait": "wait for a process, print its output",
           "stat": "a process's record", "status": "the kernel's pid, address, uptime", "models": "loaded models",
           "load": "load a model", "unload": "unload a model", "devices": "cpu and gpus",
           "metrics": "latency and throughput", "ls": "list a directory of the store", "cat": "print a file",
           "dmesg": "the kernel's log", "help": "the commands", "exit": "leave the shell"}


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
_JSON = ("--json", {"action": "store_true"})


def _run_parser(name: str) -> _Parser:
    p = _Parser(prog=name, add_help=False)
    add_generation_flags(p)  # every sampling flag of llmos run, typed and ranged by the syscall table
    p.add_argument("-n", dest="max_new_tokens", type=syscall_arg("spawn", "max_new_tokens"), default=128)
    p.add_argument("--chat", action="store_true")
    p.add_argument("prompt", nargs="+", metavar="PROMPT")
    return p


def _chat_parser() -> _Parser:
    p = _Parser(prog="chat", add_help=False)
    p.add_argument("model", nargs="?", default=None, metavar="MODEL")
    p.add_argument("--system", default=None, metavar="S")
    p.add_argument("-n", "--max-new-tokens", dest="max_new_tokens", type=syscall_arg("spawn", "max_new_tokens"),
                   default=None, metavar="N")
    for flag in ("temperature", "top_p", "top_k", "seed"):
        p.add_argument("--" + flag.replace("_", "-"), type=syscall_arg("spawn", flag), default=None,
                       metavar=flag[0].upper() if flag != "top_k" else "K")
    p.add_argument("-p", "--priority", type=syscall_arg("spawn", "priority"), default=None, metavar="P")
    return p


def _load_parser() -> _Parser:
    p = _Parser(prog="load", add_help=False)
    p.add_argument("model", nargs="?", default=None, metavar="MODEL")
    p.add_argument("--device", default=None, metavar="D")
    for flag in ("instances", "keep_alive", "kv_blocks", "max_batch", "num_cpus", "num_gpus"):
        p.add_argument("--" + flag.replace("_", "-"), type=syscall_arg("model_load", flag), default=None,
                       metavar="N" if flag != "keep_alive" else "S")
    p.add_argument("--kv-policy", choices=("static", "dynamic", "isolated"), default=None)
    p.add_argument("--engine", choices=("auto", "paged", "sequential"), default=None)
    p.add_argument("--backend", choices=("local", "ray", "auto"), default=None)
    p.add_argument("--placement", choices=("spread", "pack"), default=None)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=None)
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_const", const=False, default=None)
    p.add_argument(*_JSON[:1], **_JSON[1])
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
    "top": lambda: _parser("top", ("-n", {"dest": "iterations", "type": positive(int), "default": None,
                                          "metavar": "N"}),
                           ("-d", {"dest": "delay", "type": positive(float), "default": 2.0, "metavar": "S"})),
    "chat": _chat_parser,
    "wait": lambda: _parser("wait", _PID),
    "stat": lambda: _parser("stat", _PID),
    "status": lambda: _parser("status"),
    "models": lambda: _parser("models", _JSON),
    "load": _load_parser,
    "unload": lambda: _parser("unload", ("model", {"nargs": "?", "default": None, "metavar": "MODEL"}),
                              ("--force", {"action": "store_true"})),
    "devices": lambda: _parser("devices", _JSON),
    "metrics": lambda: _parser("metrics", _JSON),
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
    """The shell's commands over one LLMOS handle. ``read_line(prompt)`` gives chat's input lines (None at
    their end; KeyboardInterrupt for Ctrl-C). ``interactive``: a person at a terminal (top refreshes until
    Ctrl-C, model output is shown with its control characters escaped)."""

    def __init__(self, os_: LLMOS, out: TextIO | None = None, home: Path | None = None,
                 read_line: Callable[[str], str | None] = read_stdin, interactive: bool = False) -> None:
        self.os = os_
        self.out = out or sys.stdout
        self.home = home or llmos_home()
        self.read_line = read_line
        self.interactive = interactive
        self.commands: dict[str, Callable[[argparse.Namespace], None]] = {
            "run": self.do_run, "spawn": self.do_spawn, "ps": self.do_ps, "kill": self.do_kill,
            "wait": self.do_wait, "stat": self.do_stat, "status": self.do_status, "help": self.do_help,
            "stop": self.do_stop, "cont": self.do_cont, "nice": self.do_nice, "top": self.do_top,
            "chat": self.do_chat, "ls": self.do_ls, "cat": self.do_cat, "dmesg": self.do_dmesg,
            "models": self.do_models, "load": self.do_load, "unload": self.do_unload, "devices": self.do_devices,
            "metrics": self.do_metrics,
        }

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    @contextlib.contextmanager
    def loading(self, model: str | None) -> Iterator[None]:
        """While a call may wait for ``model`` to load: on a terminal, a spinner with the load's stage."""
        if not self.interactive:
            yield
            return
        from llmos.client import Client
        from llmos.progress import Spinner, Stages, model_name as short_name

        stages = Stages(lambda: Client(self.os.address), model, spawning=True, ready="starting")
        try:
            with Spinner(f"loading model {short_name(model)}", poll=stages, stream=self.out):
                yield
        finally:
            stages.close()

    def shown(self, text: str) -> str:
        """Model output as this shell shows it: escaped control characters on a terminal, as is otherwise."""
        return printable(text) if self.interactive else text

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
        text = " ".join(a.prompt)
        prompt = {"messages": [{"role": "user", "content": text}]} if a.chat else {"prompt": text}
        return self.os.spawn(model=a.model, priority=a.priority, **prompt, **sampling_params(a))

    def do_run(self, a: argparse.Namespace) -> None:
        pid = self._spawn(a)
        stream = self.os.stream(pid)
        try:
            for text in stream:
                self.say(self.shown(text), end="")
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
        frames = a.iterations if a.iterations is not None else None if self.interactive else 1
        try:
            run_top(self.os.client.metrics, frames, a.delay, self.out)
        except KeyboardInterrupt:  # the way out of a refreshing top: back to the prompt, quietly
            self.say()

    def do_chat(self, a: argparse.Namespace) -> None:
        params = {k: getattr(a, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "priority")
                  if getattr(a, k) is not None}
        chat = Chat(self.os.client, ChatSettings(a.model or self.os.model, a.system, params), self.read_line,
                    lambda t: self.say(t, end=""), self.shown, self.loading)
        pid = chat.start()
        name = typed_name(chat.settings.model) if chat.settings.model else "the default model"
        self.say(f"[chat with session pid {pid} on {name}: /? for help, /bye to leave]")
        turns = chat.run()
        self.say(f"[chat ended after {turns} turns; session {chat.last_pid} closed]")

    def do_wait(self, a: argparse.Namespace) -> None:
        r = self.os.wait(a.pid)
        self.say(self.shown(r.text))
        self.say(outcome(r) or f"[pid {r.pid}: {r.finish_reason}, {r.stats.output_tokens} tokens]")

    def do_stat(self, a: argparse.Namespace) -> None:
        self.say(self.shown(format_stat(self.os.client.stat(a.pid))))

    def do_status(self, a: argparse.Namespace) -> None:
        info = self.os.client.kernel_info()
        self.say(f"kernel {info['version']} pid {info['pid']} at {info['address']}, up {info['uptime_s']:.0f} s")
        for m in info["models"]:
            self.say(f"  {m['model']}: worker {m['worker_pid']} on {m['device']}, running {m['running']}")

    def do_models(self, a: argparse.Namespace) -> None:
        models = self.os.client.models()
        if a.json:
            self.say(json.dumps(models))
            return
        self.say(format_models(models) if models else "(no model loaded)")
        loaded = {typed_name(m["model"]) for m in models}
        stored = [name for name, _ in self._store_models() if name not in loaded]
        if stored:
            self.say(f"in the store, not loaded: {', '.join(stored)} (chat NAME or load NAME)")

    def do_load(self, a: argparse.Namespace) -> None:
        opts = {k: getattr(a, k) for k in ("device", "instances", "keep_alive", "kv_blocks", "max_batch",
                                           "kv_policy", "engine", "backend", "num_cpus", "num_gpus", "placement",
                                           "dtype", "prefix_cache")
                if getattr(a, k) is not None}
        with self.loading(a.model):
            d = self.os.client.model_load(a.model, **opts)
        self.say(json.dumps(d) if a.json else format_models([d]))

    def do_unload(self, a: argparse.Namespace) -> None:
        d = self.os.client.model_unload(a.model, force=a.force)
        self.say(f"unloaded {d['model']}")

    def do_devices(self, a: argparse.Namespace) -> None:
        devices = self.os.client.devices()
        self.say(json.dumps(devices) if a.json else format_devices(devices))

    def do_metrics(self, a: argparse.Namespace) -> None:
        m = self.os.client.metrics()
        self.say(json.dumps(m) if a.json else format_metrics(m))

    def do_ls(self, a: argparse.Namespace) -> None:
        from llmos.cli_fs import format_ls, truncated_note

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

    # -- what Tab completes from (llmos.shell_complete) --------------------------------------------
    def _pids(self) -> list[tuple[int, str]]:
        return [(p.pid, f"{p.state} {p.owner} {typed_name(p.model)[-24:]}") for p in self.os.ps()]

    def _store_models(self) -> list[tuple[str, str]]:
        try:
            return [(e.name, "in the store") for e in self.os.fs.ls("/models")]
        except LLMOSError:  # a store this user may not list: the loaded models are still named
            return []

    def _models(self) -> list[tuple[str, str]]:
        names = {typed_name(m["model"]): "loaded" for m in self.os.client.models()}
        for name, what in [*self._store_models(), ("default", "the shipped default model")]:
            names.setdefault(name, what)
        return list(names.items())

    def _entries(self, directory: str) -> list[tuple[str, bool]]:
        return [(e.name, e.kind == "dir") for e in self.os.fs.ls(directory)]

    def completers(self) -> tuple[ShellCompleter, ChatCompleter]:
        """Tab's completers for the shell's prompt and chat's, sharing one cache of model names."""
        shell = ShellCompleter(SUMMARY, self._pids, self._models, self._entries)
        return shell, ChatCompleter(CHAT_COMMANDS, SETTING_HELP, shell.models)


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
    from prompt_toolkit.formatted_text import FormattedText
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.key_binding.bindings.search import accept_search_and_accept_input

    keys = KeyBindings()
    # Enter in a Ctrl-R search runs the line found, as bash does (prompt_toolkit's default only ends the search)
    keys.add("enter")(accept_search_and_accept_input)
    complete_shell, complete_chat = shell.completers()
    session: PromptSession = PromptSession(history=FileHistory(str(history_file(home))), key_bindings=keys,
                                           complete_while_typing=False)  # Tab asks: the kernel is asked then
    hint = FormattedText([("fg:ansibrightblack", "Send a message (/? for help)")])

    def read_line(prompt: str) -> str | None:  # chat's lines; Ctrl-C comes as KeyboardInterrupt
        try:
            return session.prompt(prompt, completer=complete_chat, placeholder=hint if prompt == ">>> " else "")
        except EOFError:
            return None

    shell.read_line = read_line
    while True:
        try:
            line = session.prompt("llmos> ", completer=complete_shell, placeholder="")
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
    shell = Shell(os_, home=home, interactive=sys.stdin.isatty() and sys.stdout.isatty())
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
