"""The ``llmos`` command: its parser and exit codes, and the process commands (run, spawn, chat, ps, top,
kill/stop/cont, nice, wait, stat); the other families live in cli_kernel, cli_models, cli_fs, cli_store,
cli_users, cli_serve, cli_apps and cli_bench.

Exit codes: 0 success; 1 the kernel refused the request (the message carries its errno); 2 a
usage error (a bad flag, address or home); 3/4 ``kernel start`` found the address taken
(llmos.kernel.main); 70 an internal error (one line; LLMOS_DEBUG=1 prints the traceback);
130 Ctrl-C; 143 SIGTERM to the command (``run`` and ``chat`` end their process first, as for Ctrl-C); 141 stdout closed early (``llmos ps | head``); 128+N a process ended by signal N
(``run`` and ``wait``: 143 TERM, 137 KILL).
"""

from __future__ import annotations

import contextlib
import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

from llmos.client import Client
from llmos.kernel.config import home_dir
from llmos.syscalls.errors import InvalidArgument, LLMOSError, NoSuchProcess
from llmos._command import address_of, connect, home_of
from llmos._args import add_generation_flags, positive, sampling_params, signal_name, syscall_arg
from llmos.cli_fs import add_commands as add_fs_commands
from llmos.cli_kernel import add_commands as add_kernel_commands
from llmos.cli_models import add_commands as add_model_commands
from llmos.cli_store import add_commands as add_store_commands
from llmos.cli_users import add_commands as add_user_commands
from llmos.cli_serve import add_commands as add_serve_commands
from llmos.cli_apps import add_commands as add_app_commands
from llmos.cli_bench import add_commands as add_bench_commands
from llmos.progress import Spinner, Stages
from llmos.top import format_ps, run_top
from llmos.types import ProcessInfo, ProcessResult

EXIT_USAGE = 2
EXIT_INTERNAL = 70  # EX_SOFTWARE
EXIT_SIGPIPE = 128 + signal.SIGPIPE


class Terminated(Exception):
    """SIGTERM reached the command: raised where it was, like KeyboardInterrupt, so that ``run`` and ``chat``
    end the process they own (a ``kill`` of ``llmos run`` must not orphan its process and its KV)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second TERM ends the command at once, as Unix tools do
    raise Terminated()


def exit_status(result: ProcessResult) -> int:
    """A finished process as a command's exit status: 0, 1 for an error, 128+N when signal N ended it."""
    if result.finish_reason == "error":
        return 1
    if result.finish_reason == "killed":
        return 128 + signal.Signals["SIG" + (result.signal or "TERM")].value
    return 0


def outcome(result: ProcessResult) -> str | None:
    """What a command prints on stderr about a result: the kernel's warnings (e.g. max_new_tokens cut to the
    context) and how it ended when that was not normal; None when there is nothing to say."""
    lines = [f"[pid {result.pid}: warning: {w}]" for w in result.warnings]
    if result.finish_reason == "error":
        lines.append(f"[pid {result.pid} failed: {(result.error or {}).get('message', '')}]")
    elif result.finish_reason == "killed":
        lines.append(f"[pid {result.pid} killed by SIG{result.signal or 'TERM'}]")
    return "\n".join(lines) or None


def reap(client: Any, pid: int) -> None:
    """Collect a finished process so it leaves no ZOMBIE; another client may have collected it first."""
    try:
        client.wait(pid, timeout=30)
    except NoSuchProcess:
        pass


def end(client: Any, pid: int) -> ProcessResult | None:
    """Stop a process of ours (TERM: it keeps its output) and reap it; its result, or None if already gone."""
    try:
        client.kill(pid, "TERM")
        return client.wait(pid, timeout=30)
    except NoSuchProcess:
        return None


# -- processes -----------------------------------------------------------------------------
def cmd_spawn(args: argparse.Namespace) -> int:
    """Start a process in the background and print its pid (``llmos wait PID`` collects it). Needs a running
    kernel: an embedded one would end, and the process with it, when this command exits."""
    with connect(args) as c:
        kwargs: dict[str, Any] = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat \
            else {"prompt": args.prompt}
        pid = c.spawn(model=args.model, priority=args.priority, **kwargs, **sampling_params(args))
    print(json.dumps({"pid": pid}) if args.json else pid)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from llmos.llmos import LLMOS

    address = address_of(args)
    # until the first token, a spinner on a terminal's stderr says what the run waits for (gone before the text)
    stages = Stages(lambda: Client(address), args.model)
    spinner = Spinner("connecting to the kernel", poll=stages).start()
    try:
        os_ = LLMOS(model_path=args.model, address=address, home=args.home)
    except BaseException:
        spinner.stop()
        raise
    try:
        kwargs: dict[str, Any] = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat \
            else {"prompt": args.prompt}
        spinner.stage("starting the process")  # the spinner's look says "loading model" when the spawn waits for it
        stages.spawning = True
        pid = os_.spawn(priority=args.priority, **kwargs, **sampling_params(args))
        stages.pid = pid
        spinner.stage("waiting in queue")
        if args.verbose:
            spinner.print(f"[pid {pid}]")
        stream = os_.stream(pid)
        try:
            for text in stream:
                spinner.stop()  # the first token: the line is erased before it prints
                if not args.json:
                    sys.stdout.write(text)
                    sys.stdout.flush()
        except (KeyboardInterrupt, Terminated) as exc:
            spinner.stop()
            stream.close()
            end(os_.client, pid)  # ours to stop and to reap: nobody else waits for it
            by = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
            print(f"\n[pid {pid} stopped by {by}]", file=sys.stderr)
            return 128 + signal.SIGTERM if isinstance(exc, Terminated) else 130
        except BrokenPipeError:
            stream.close()
            end(os_.client, pid)
            raise
        spinner.stop()  # a run with no output at all
        result = stream.result  # the stream's final frame: the result, whoever reaps the process
        assert result is not None, "a stream ends with its final frame"
        reap(os_.client, pid)
        if args.json:
            print(json.dumps(result_json(result)))
            return exit_status(result)
        sys.stdout.write("\n")
        said = outcome(result)
        if said:
            print(said, file=sys.stderr)
        if args.verbose and result.finish_reason in ("stop", "length"):
            s = result.stats
            print(f"[pid {pid}: {result.finish_reason}, {s.output_tokens} tokens, ttft {s.ttft_s or 0:.3f} s]",
                  file=sys.stderr)
        return exit_status(result)
    finally:
        spinner.stop()
        stages.close()
        os_.close()


def cmd_ps(args: argparse.Namespace) -> int:
    with connect(args) as c:
        procs = c.ps()
    if args.json:
        print(json.dumps([p.__dict__ for p in procs]))
    else:
        print(format_ps(procs))
    return 0


def kill_message(pid: int, sig: str, state: str, before: str | None = None) -> str:
    """What ``kill`` tells the user: what the reply's ``state`` says happened, and how to go on.

    ``before``: the state a ``stat`` saw just before the signal (None: unknown). Nothing is claimed that the
    states do not show: CONT of a process that was not STOPPED did nothing, STOP/CONT of an ended one neither.
    """
    collect = f"`llmos wait {pid}` collects it"
    if state == "ZOMBIE" and (sig in ("STOP", "CONT") or before == "ZOMBIE"):
        return f"pid {pid} has already ended (ZOMBIE): nothing to {sig}; {collect}"
    if sig == "STOP":
        if before == "STOPPED":
            return f"pid {pid} was already STOPPED; `llmos cont {pid}` resumes it"
        if state == "STOPPED":
            return f"sent STOP to pid {pid}: it is STOPPED, out of the batch with its context kept; " \
                   f"`llmos cont {pid}` resumes it"
        return f"sent STOP to pid {pid}: it is {state}"
    if sig == "CONT":
        if before is not None and before != "STOPPED":
            return f"pid {pid} was not stopped; it is {state}"
        if before == "STOPPED" and state != "STOPPED":
            return f"sent CONT to pid {pid}: it is {state}, resuming where it stopped"
        return f"sent CONT to pid {pid}: it is {state}"
    if sig == "KILL":
        return f"sent KILL to pid {pid}: it has ended at once; {collect}"
    if state == "ZOMBIE":
        return f"sent TERM to pid {pid}: it has ended, keeping its output; {collect}"
    return f"sent TERM to pid {pid}: it stops after its current step, keeping its output; {collect}"


def signal_states(client: Any, pid: int, sig: str) -> tuple[str, str]:
    """Signal ``pid``; (its state before, its state after). The reply carries only the state after delivery, so
    the state before is read first (a ``stat``): it is what tells a CONT that resumed a process from one that
    found it running. Raises as ``kill``."""
    before = client.stat(pid).state
    return before, client.kill(pid, sig)


def send_signal(client: Any, pid: int, sig: str) -> tuple[str, int]:
    """Signal ``pid`` and return (what to tell the user, exit status): 1 when STOP/CONT found it ended."""
    before, state = signal_states(client, pid, sig)
    ended = state == "ZOMBIE" and sig in ("STOP", "CONT")
    return kill_message(pid, sig, state, before), 1 if ended else 0


def _signal(args: argparse.Namespace, sig: str) -> int:
    with connect(args) as c:
        before, state = signal_states(c, args.pid, sig)
    said = kill_message(args.pid, sig, state, before)
    status = 1 if state == "ZOMBIE" and sig in ("STOP", "CONT") else 0
    if args.json:  # the same status; the message rides along for a program that shows it
        print(json.dumps({"pid": args.pid, "signal": sig, "before": before, "state": state, "message": said}))
    else:
        print(said, file=sys.stderr if status else sys.stdout)
    return status


def cmd_kill(args: argparse.Namespace) -> int:
    return _signal(args, args.sig or args.signal or "TERM")


def cmd_signal(sig: str) -> Callable[[argparse.Namespace], int]:
    """``llmos stop PID`` and ``llmos cont PID``: kill with STOP or CONT."""
    return lambda args: _signal(args, sig)


def nice_message(pid: int, reply: dict[str, Any]) -> str:
    return f"pid {pid}: priority {reply['priority']} (state {reply['state']})"


def cmd_nice(args: argparse.Namespace) -> int:
    with connect(args) as c:
        reply = c.nice(args.pid, args.priority)
    print(json.dumps({"pid": args.pid, **reply}) if args.json else nice_message(args.pid, reply))
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    with connect(args) as c:
        run_top(c.metrics, args.iterations, args.delay)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from llmos.chat import chat_loop

    interactive = sys.stdin.isatty()

    def read() -> str | None:
        if interactive:
            try:
                return input("you> ")
            except EOFError:
                return None
        return sys.stdin.readline() or None

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    params = sampling_params(args)
    address = address_of(args)
    stages = Stages(lambda: Client(address), args.model, spawning=True, ready="starting the session")
    with connect(args) as c:
        try:  # a spinner while the session starts (its model may load) on a terminal's stderr, gone before "you>"
            with Spinner("starting the session", poll=stages):
                session = c.session(args.model, args.system, priority=args.priority, **params)
        finally:
            stages.close()
        with session as s:
            if args.verbose:
                print(f"[session pid {s.pid}]", file=sys.stderr, flush=True)
            chat_loop(s, read, write, empty_ends=False, as_json=args.json)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    with connect(args) as c:
        r = c.wait(args.pid, timeout=args.timeout)
    print(json.dumps(result_json(r)) if args.json else r.text)
    said = outcome(r)
    if said and not args.json:
        print(said, file=sys.stderr)
    return exit_status(r)


def result_json(r: ProcessResult) -> dict[str, Any]:
    """A finished process as ``wait --json`` and ``run --json`` print it."""
    return {"pid": r.pid, "finish_reason": r.finish_reason, "signal": r.signal, "text": r.text,
            "token_ids": r.token_ids, "stats": r.stats.__dict__, "sched": r.sched, "error": r.error,
            "warnings": r.warnings}


def format_stat(p: ProcessInfo) -> str:
    """``llmos stat`` for people: the record, then its stats and scheduler counters (times in seconds), then the
    text so far."""
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.created)) if p.created else "-"
    rows = [("pid", p.pid), ("state", p.state + (f" ({p.finish_reason})" if p.finish_reason else "")),
            ("owner", p.owner), ("model", p.model), ("nice", p.priority), ("session", "yes" if p.session else "no"),
            ("created", created), ("tokens", f"{p.prompt_tokens} in, {p.output_tokens} out"),
            ("kv blocks", p.kv_blocks), ("preemptions", p.preemptions)]
    rows += [(k.replace("_", " "), _num(v)) for k, v in p.stats.items() if v is not None and k not in
             ("prompt_tokens", "output_tokens")]
    rows += [(k.replace("_", " "), _num(v)) for k, v in p.sched.items() if not isinstance(v, dict)]
    times = (p.sched or {}).get("time_in_state") or {}
    if times:
        rows.append(("time in state", ", ".join(f"{k} {_num(v)} s" for k, v in times.items())))
    lines = [f"{k:>20}: {v}" for k, v in rows]
    if p.text:
        lines += ["", p.text]
    return "\n".join(lines)


def _num(v: Any) -> str:
    return f"{v:.4f}".rstrip("0").rstrip(".") if isinstance(v, float) else str(v)


def cmd_stat(args: argparse.Namespace) -> int:
    with connect(args) as c:
        info = c.stat(args.pid)
    print(json.dumps(info.__dict__) if args.json else format_stat(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmos", description="LLMOS: an operating-system-style kernel for LLMs")
    # --address and --home go before the subcommand or after it (llmos --home H ps, llmos ps --home H)
    common = argparse.ArgumentParser(add_help=False)
    for parser, default in ((ap, None), (common, argparse.SUPPRESS)):
        parser.add_argument("--address", default=default, help="kernel bus address: ipc:///path or tcp://HOST:PORT "
                            "(default: ipc under --home, else $LLMOS_ADDRESS, else ipc under $LLMOS_HOME/run)")
        parser.add_argument("--home", type=home_dir, default=default,
                            help="state directory (default: $LLMOS_HOME or ~/.llmos)")
        parser.add_argument("--server-key", default=default, metavar="FILE",
                            help="tcp: the kernel's public key file (default: $LLMOS_SERVER_KEY, else "
                            "HOME/keys/kernel.key)")
        parser.add_argument("--client-key", default=default, metavar="FILE",
                            help="tcp: your secret key file (default: $LLMOS_CLIENT_KEY, else HOME/keys/"
                            "client.key_secret, made by llmos keygen)")
    sub = ap.add_subparsers(dest="command", required=True)
    add_kernel_commands(sub, common)  # kernel start|stop|status (llmos/cli_kernel.py)

    r = sub.add_parser("run", parents=[common], help="generate from a prompt, streaming tokens to stdout",
                       description="Generate from PROMPT, streaming the text to stdout. Sampling is at "
                                   "temperature 0.8 by default, so every run differs; --temperature 0 "
                                   "(greedy) repeats a run exactly. Exit status: 0, 1 on an error, "
                                   "143/137 when the process was killed (TERM/KILL), 130 on Ctrl-C.")
    r.add_argument("prompt", help="the prompt text (a user chat message with --chat)")
    add_generation_flags(r)
    r.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    r.add_argument("-v", "--verbose", action="store_true",
                   help="print the pid once spawned, then the finish reason and timings, to stderr")
    r.add_argument("--json", action="store_true", help="print the result once it ends, as one JSON object (as "
                   "wait --json: pid, text, token_ids, finish_reason, stats, sched, error, warnings), instead of "
                   "streaming the text")
    r.set_defaults(fn=cmd_run)

    sp = sub.add_parser("spawn", parents=[common], help="start a process in the background and print its pid",
                        description="Start a process from PROMPT (the same flags as run) and print its pid at once; "
                        "`llmos wait PID` prints its text, `llmos ps` shows it, `llmos kill PID` ends it. Needs a "
                        "running kernel (llmos kernel start).")
    sp.add_argument("prompt", help="the prompt text (a user chat message with --chat)")
    add_generation_flags(sp)
    sp.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    sp.add_argument("--json", action="store_true", help='print {"pid": N}')
    sp.set_defaults(fn=cmd_spawn)

    ch = sub.add_parser("chat", parents=[common], help="a conversation: each line of stdin is a turn, each reply "
                        "is printed", description="Start a session (a process that keeps its context between "
                        "turns) and send it each line read from stdin; the reply streams to stdout as generated, "
                        "then a newline (a reply may itself hold newlines: --json keeps turns apart). Ends at end "
                        "of input or /exit; the session is closed. Empty lines are skipped.")
    ch.add_argument("--system", default=None, help="system prompt (a system message, for a model with a chat "
                    "template; ignored by a model without one; default: none)")
    add_generation_flags(ch)
    ch.add_argument("-v", "--verbose", action="store_true", help="print the session's pid to stderr")
    ch.add_argument("--json", action="store_true", help="print each turn, once it ends, as one line of JSON: "
                    "{pid, text, finish_reason, stats, error} (replies may hold newlines: this keeps turns apart)")
    ch.set_defaults(fn=cmd_chat)

    p = sub.add_parser("ps", parents=[common], help="list processes: state, nice, tokens, KV blocks, sessions (*)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_ps)
    tp = sub.add_parser("top", parents=[common], help="a refreshing view: processes, batch, KV use, tok/s")
    tp.add_argument("-n", "--iterations", type=positive(int), default=None,
                    help="frames to show, then exit (default: until Ctrl-C)")
    tp.add_argument("-d", "--delay", type=positive(float), default=2.0, help="seconds between frames (default 2)")
    tp.set_defaults(fn=cmd_top)
    kl = sub.add_parser("kill", parents=[common], help="signal a process (TERM keeps partial output; KILL ends it "
                        "at once; STOP suspends it; CONT resumes it)")
    kl.add_argument("pid", type=syscall_arg("kill", "pid"), help="process id")
    kl.add_argument("signal", nargs="?", default=None, type=signal_name, help="TERM (default), KILL, STOP or CONT")
    kl.add_argument("-s", "--signal", dest="sig", default=None, type=signal_name, metavar="SIGNAL",
                    help="the signal, as an option (kill -s STOP PID; default TERM)")
    kl.add_argument("--json", action="store_true", help=SIGNAL_JSON)
    kl.set_defaults(fn=cmd_kill)
    for name, sig, what in (("stop", "STOP", "suspend a process: it leaves the batch, its context kept (kill -s STOP)"),
                            ("cont", "CONT", "resume a stopped process where it was (kill -s CONT)")):
        sp = sub.add_parser(name, parents=[common], help=what)
        sp.add_argument("pid", type=syscall_arg("kill", "pid"), help="process id")
        sp.add_argument("--json", action="store_true", help=SIGNAL_JSON)
        sp.set_defaults(fn=cmd_signal(sig))
    nc = sub.add_parser("nice", parents=[common], help="change a live process's priority (renice)",
                        description="Set PID's nice value to N (-20..19, lower runs first). Only the owner or "
                                    "root may; below 0 only root.")
    nc.add_argument("pid", type=syscall_arg("nice", "pid"), help="process id")
    nc.add_argument("priority", type=syscall_arg("nice", "priority"), metavar="N", help="new nice value, -20..19")
    nc.add_argument("--json", action="store_true", help="print {pid, priority, state}")
    nc.set_defaults(fn=cmd_nice)
    w = sub.add_parser("wait", parents=[common], help="wait for a process and print its output")
    w.add_argument("pid", type=syscall_arg("wait", "pid"), help="process id")
    w.add_argument("--timeout", type=syscall_arg("wait", "timeout"), default=None,
                   help="seconds to wait (default: until it ends); past them exit 1 with ETIMEDOUT")
    w.add_argument("--json", action="store_true")
    w.set_defaults(fn=cmd_wait)
    st = sub.add_parser("stat", parents=[common], help="one process's record and stats")
    st.add_argument("pid", type=syscall_arg("stat", "pid"), help="process id")
    st.add_argument("--json", action="store_true", help="the record as one JSON object (stats, sched, text)")
    st.set_defaults(fn=cmd_stat)

    add_model_commands(sub, common)  # models, load, unload, model-info, devices, metrics (llmos/cli_models.py)
    add_fs_commands(sub, common)  # fs ls|cat|put|get|rm|stat, dmesg (llmos/cli_fs.py)
    add_store_commands(sub, common)  # model import|export|ls|rm, data import|ls|stat|cat|rm, eval (llmos/cli_store.py)
    add_user_commands(sub, common)  # whoami, keygen, user add|ls|rm (llmos/cli_users.py)
    add_serve_commands(sub, common)  # serve: the OpenAI-compatible gateway (llmos/cli_serve.py)
    add_app_commands(sub, common)  # app translate|summarize|qa|chat|generate (llmos/cli_apps.py)
    add_bench_commands(sub, common)  # bench: a serving workload against a running kernel (llmos/cli_bench.py)
    fill_help(ap)
    return ap


SIGNAL_JSON = "print {pid, signal, before, state, message} (the states before and after the signal)"

# help for the arguments that many commands share, where a command did not give its own
SHARED_HELP = {"json": "print the result as JSON (for programs) instead of a table for people",
               "path": "a path in the store's namespace (/models, /data, /proc, /home/<user>, /var/log)",
               "name": "the name in the store (/models/<name> or /data/<name>)",
               "model": "a model directory, a model in the store by name, or 'default'",
               "recursive": "also everything under the path (a directory)",
               "src": "the path to move", "dst": "where it goes",
               "local": "a file on this machine (- for stdin or stdout)",
               "file": "the local file to import",
               "format": "how the file is read: text, jsonl or csv (default text)"}


def fill_help(parser: argparse.ArgumentParser) -> None:
    """Give every argument of every subcommand that has no help text the shared one for its name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                fill_help(sub)
        elif not action.help and action.dest in SHARED_HELP:
            action.help = SHARED_HELP[action.dest]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        return _run_command(args)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run_command(args)
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() may be called in-process (tests, embedding programs)


def _run_command(args: argparse.Namespace) -> int:
    try:
        address_of(args)
        try:
            bad_home = home_of(args).exists() and not home_of(args).is_dir()
        except PermissionError:  # a home this user may not look at: only defaults come from it
            bad_home = False
        if bad_home:
            raise InvalidArgument(f"the home {home_of(args)} is not a directory")
    except LLMOSError as exc:  # a bad --address, $LLMOS_ADDRESS or --home: a usage error, like a bad flag
        print(f"llmos: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    with _key_environment(args):
        return _run_fn(args)


@contextlib.contextmanager
def _key_environment(args: argparse.Namespace) -> Iterator[None]:
    """For the command's length: keys are found where the flags say, then under --home (the clients read the
    environment); ``kernel start --insecure``'s launcher talks plain tcp to its kernel. Restored after (main()
    may run in-process)."""
    saved = {k: os.environ.get(k) for k in ("LLMOS_HOME", "LLMOS_SERVER_KEY", "LLMOS_CLIENT_KEY", "LLMOS_INSECURE")}
    try:
        if getattr(args, "home", None):
            os.environ["LLMOS_HOME"] = str(home_of(args))
        for flag, env in (("server_key", "LLMOS_SERVER_KEY"), ("client_key", "LLMOS_CLIENT_KEY")):
            given = getattr(args, flag, None)
            if given:  # a file (made absolute) or, for --server-key, the key's 40 characters
                path = Path(given).expanduser()
                os.environ[env] = str(path.resolve()) if path.exists() else given
        if getattr(args, "insecure", None):
            os.environ["LLMOS_INSECURE"] = "1"
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_fn(args: argparse.Namespace) -> int:
    try:
        return args.fn(args)
    except LLMOSError as exc:
        print(f"llmos: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Terminated:  # a chat's session was closed on the way out (its ``with``)
        print(file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:  # the reader left (llmos ps | head): end quietly, as Unix tools do
        quiet_stdout()
        return EXIT_SIGPIPE
    except OSError as exc:  # a file the user named or the home cannot be used
        print(f"llmos: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 1
    except Exception as exc:
        return internal_error("llmos", exc, home_of(args))


def quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush cannot raise BrokenPipeError again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def internal_error(prog: str, exc: BaseException, home: Path) -> int:
    """The last resort for a bug: one line, where to look, and the traceback only with LLMOS_DEBUG=1."""
    if os.environ.get("LLMOS_DEBUG", "") not in ("", "0"):
        traceback.print_exception(exc)
    print(f"{prog}: internal error: {type(exc).__name__}: {str(exc)[:500]} (a bug in llmos; run with "
          f"LLMOS_DEBUG=1 for the traceback; the kernel's log is {home / 'log' / 'kernel.log'})", file=sys.stderr)
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
