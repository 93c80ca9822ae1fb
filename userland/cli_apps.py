"""The ``llmos app`` commands: translate, summarize, qa, chat and generate (the seed's applications, llmos.apps).

Each reads its input from the files it is given (``-``: stdin) or from stdin, streams its output to stdout
as it is generated (``--json``: one JSON object once done instead), and takes the generation flags of
``llmos run``. Like ``run`` it uses a running kernel, else starts one for the command's length. Exit status:
0; 1 for an error (one ``llmos: [ERRNO] ...`` line); 130 on Ctrl-C and 143 on SIGTERM (the process ended
first); 128+N when signal N ended the app's process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from llmos._command import address_of
from llmos._args import add_generation_flags, sampling_params
from llmos.syscalls.errors import InvalidArgument, NotFound, NotPermitted

if TYPE_CHECKING:
    from llmos.apps.base import AppModel


# -- input -----------------------------------------------------------------------------------------
def read_text(paths: list[str]) -> str:
    """The input: the files in ``paths`` (``-`` is stdin) joined by blank lines, or stdin when there are none.
    NotFound (ENOENT), NotPermitted (EPERM), InvalidArgument (EINVAL: a directory, not UTF-8, or empty) name the
    input at fault."""
    texts = []
    for path in paths or ["-"]:
        text = _read_one(path)
        if not text.strip():
            raise InvalidArgument(f"{_label(path)} is empty: nothing to work on")
        texts.append(text.strip("\r\n"))
    return "\n\n".join(texts)


def _label(path: str) -> str:
    return "stdin" if path == "-" else path


def _read_one(path: str) -> str:
    if path == "-":
        if sys.stdin.isatty():
            print("(reading stdin: end with Ctrl-D)", file=sys.stderr, flush=True)
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{path}: no such file") from None
        except IsADirectoryError:
            raise InvalidArgument(f"{path} is a directory, not a text file") from None
        except PermissionError:
            raise NotPermitted(f"{path}: permission denied") from None
        except OSError as exc:
            raise InvalidArgument(f"{path}: cannot read it: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")  # a BOM an editor wrote is not text
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{_label(path)} is not UTF-8 text (byte {exc.start} is not)") from None


def read_lines(paths: list[str]) -> Iterator[str]:
    """Each line of the files in ``paths`` (``-``: stdin), or of stdin; a terminal gets a ``you>`` prompt."""
    for path in paths or ["-"]:
        if path == "-" and sys.stdin.isatty():
            while True:
                try:
                    yield input("you> ")
                except EOFError:
                    return
        elif path == "-":
            yield from (line.rstrip("\r\n") for line in sys.stdin)
        else:
            yield from _read_one(path).splitlines()


# -- running an app ------------------------------------------------------------------------------
def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class _Watch:
    """What a person sees while an app waits: on a terminal's stderr a spinner naming the stage (loading the
    model, the process's purpose and its state), erased before the first text of the output; with -v a line
    per process. ``on_spawn`` is AppModel's hook; ``write`` the output's writer (None: --json)."""

    def __init__(self, address: str, model: str | None, verbose: bool, streamed: bool) -> None:
        from llmos.client import Client
        from llmos.progress import Spinner, Stages

        self.verbose, self.purpose = verbose, ""
        # spawning from the start: the app's first call (model_info, score) may be what loads the model
        self.stages = Stages(lambda: Client(address), model, spawning=True)
        self.spinner = Spinner("connecting to the kernel", poll=self._poll).start()
        self.write: Callable[[str], None] | None = self._write if streamed else None

    def _poll(self) -> str | None:
        said = self.stages()
        return f"{self.purpose}: {said}" if said and self.purpose and self.stages.pid is not None else said

    def on_spawn(self, purpose: str, pid: int | None) -> None:
        self.purpose = purpose
        self.stages.pid = pid
        self.spinner.stage(f"{purpose}: {'starting the process' if pid is None else 'waiting in queue'}")
        if pid is not None and self.verbose:
            self.spinner.print(f"[pid {pid}: {purpose}]")

    def _write(self, text: str) -> None:
        self.spinner.stop()  # the output's first text: the spinner's line is erased before it
        _write(text)

    def close(self) -> None:
        self.spinner.stop()
        self.stages.close()


def _run(args: argparse.Namespace, name: str, work: Callable[["AppModel", Callable[[str], None] | None], Any]) -> int:
    """Connect (or start a kernel, as ``run`` does), run ``work(app, write)`` and report: the streamed text and a
    newline, or ``--json``'s object; the kernel's warnings on stderr; the exit status of the last process."""
    from llmos.apps.base import AppModel
    from llmos.cli import exit_status
    from llmos.llmos import LLMOS

    watch = _Watch(address_of(args), args.model, args.verbose, streamed=not args.json)
    os_ = None
    try:
        os_ = LLMOS(model_path=args.model, address=address_of(args), home=args.home)
        app = AppModel(os_.client, args.model, sampling_params(args), args.priority, watch.on_spawn)
        extra = work(app, watch.write)
    finally:
        watch.close()  # before an embedded kernel's shutdown: the spinner would show a stale stage meanwhile
        if os_ is not None:
            os_.close()
    last = app.last
    if args.json:
        out = {"app": name, "model": args.model or "default", "text": last.text if last else "",
               "finish_reason": last.finish_reason if last else None,
               "calls": [c.to_json() for c in app.calls], "warnings": app.warnings, **(extra or {})}
        print(json.dumps(out, ensure_ascii=False))
    else:
        _write("\n")
        for w in app.warnings:
            print(f"[{w}]", file=sys.stderr)
        if last is not None and last.finish_reason == "killed":
            print(f"[pid {last.pid} killed by SIG{last.signal or 'TERM'}]", file=sys.stderr)
        elif last is not None and last.finish_reason == "length" and not args.ignore_eos:
            print(f"[pid {last.pid}: the output stopped at --max-new-tokens ({last.stats.output_tokens} tokens)]",
                  file=sys.stderr)
    return exit_status(last) if last is not None else 0


def cmd_translate(args: argparse.Namespace) -> int:
    from llmos.apps.languages import language
    from llmos.apps.translate import translate

    target, source = language(args.to), language(args.source) if args.source else None  # before reading input
    text = read_text(args.files)

    def work(app: "AppModel", write: Callable[[str], None] | None) -> dict[str, Any]:
        translate(app, text, target, source, write)
        return {"to": target, "from": source}

    return _run(args, "translate", work)


def cmd_summarize(args: argparse.Namespace) -> int:
    from llmos.apps.summarize import summarize

    text = read_text(args.files)

    def work(app: "AppModel", write: Callable[[str], None] | None) -> dict[str, Any]:
        _, plan = summarize(app, text, write)
        return {"plan": plan.to_json()}

    return _run(args, "summarize", work)


def cmd_qa(args: argparse.Namespace) -> int:
    from llmos.apps.qa import answer, data_context

    if not args.context and not args.context_data:
        raise InvalidArgument("give the context: --context FILE or --context-data NAME (a data set in the store)")
    if args.question is None and "-" in (args.context or []):
        raise InvalidArgument("stdin cannot be both the context and the question: give the QUESTION argument")
    files = read_text(args.context) if args.context else ""
    question = args.question if args.question is not None else read_text([])

    def work(app: "AppModel", write: Callable[[str], None] | None) -> dict[str, Any]:
        parts = [files] if files else []
        if args.context_data:
            parts.append(data_context(app.client, args.context_data))
        answer(app, "\n\n".join(parts), question, write)
        return {"question": question.strip()}

    return _run(args, "qa", work)


def cmd_generate(args: argparse.Namespace) -> int:
    from llmos.apps.generate import generate

    text = read_text(args.files)

    def work(app: "AppModel", write: Callable[[str], None] | None) -> dict[str, Any]:
        generate(app, text, write, raw=args.raw)
        return {"raw": args.raw}

    return _run(args, "generate", work)


def cmd_chat(args: argparse.Namespace) -> int:
    from llmos.apps.base import AppModel
    from llmos.apps.chat import Dialogue
    from llmos.chat import EXIT_WORDS, turn_json
    from llmos.llmos import LLMOS

    lines = read_lines(args.files)
    watch = _Watch(address_of(args), args.model, args.verbose, streamed=False)
    try:
        os_ = LLMOS(model_path=args.model, address=address_of(args), home=args.home)
    except BaseException:
        watch.close()
        raise
    try:
        app = AppModel(os_.client, args.model, sampling_params(args), args.priority, watch.on_spawn)
        try:  # the spinner until the session has started (its model may load), gone before "you>"
            dialogue = Dialogue(app, args.system)
        finally:
            watch.close()
        with dialogue:
            for line in lines:
                if line.strip() in EXIT_WORDS:
                    break
                if not line.strip():
                    continue
                if args.json:
                    try:
                        dialogue.turn(line)
                    finally:
                        if dialogue.last is not None:
                            print(turn_json(dialogue.last), flush=True)
                    continue
                try:
                    dialogue.turn(line, _write)
                finally:
                    _write("\n")  # the reply's line ends, even when the turn failed
        return 0
    finally:
        os_.close()


# -- the parsers -----------------------------------------------------------------------------------
def _set_help(parser: argparse.ArgumentParser, dest: str, default: Any, text: str) -> None:
    for action in parser._actions:
        if action.dest == dest:
            action.default, action.help = default, text


def _app_flags(parser: argparse.ArgumentParser, json_help: str) -> None:
    add_generation_flags(parser)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print each process's pid and what it is for (a summary's parts too) to stderr")
    parser.add_argument("--json", action="store_true", help=json_help)


JSON_HELP = ("print one JSON object once done instead of streaming: {app, model, text, finish_reason, calls (pid, "
             "purpose, prompt_tokens, output_tokens, finish_reason of each process), warnings, ...}")
FILES_HELP = "input files, joined by blank lines (- is stdin; default: stdin)"


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``llmos app translate|summarize|qa|chat|generate``."""
    app = sub.add_parser("app", help="the applications: translate, summarize, qa, chat, generate (docs/apps.md)",
                         description="Small programs on the client API, each on any chat model (--model: a Hugging "
                         "Face model directory or a model in the store). Each reads files or stdin and streams "
                         "its output to stdout; prompts are in docs/apps.md.")
    apps = app.add_subparsers(dest="app", required=True)

    t = apps.add_parser("translate", parents=[common], help="translate the input into another language",
                        description="Translate the input (files or stdin) into --to, streaming the translation. "
                        "The text must fit the model's context with its translation.")
    t.add_argument("files", nargs="*", metavar="FILE", help=FILES_HELP)
    t.add_argument("--to", required=True, metavar="LANG",
                   help="the language to translate into: an English name (French) or an ISO 639-1 code (fr)")
    t.add_argument("--from", dest="source", default=None, metavar="LANG",
                   help="the input's language (default: whatever it is written in; the model tells)")
    _app_flags(t, JSON_HELP + " plus to and from")
    _set_help(t, "max_new_tokens", 512, "most tokens of the translation (default 512)")
    t.set_defaults(fn=cmd_translate)

    s = apps.add_parser("summarize", parents=[common], help="summarise the input, of any length",
                        description="Summarise the input (files or stdin), streaming the summary. A text longer "
                        "than the model's context is split into parts on paragraph and sentence boundaries, each "
                        "part summarised, and the summaries combined (again, while they are too long together).")
    s.add_argument("files", nargs="*", metavar="FILE", help=FILES_HELP)
    _app_flags(s, JSON_HELP + " plus plan: {context, part_budget, combine_budget (tokens), parts, rounds}")
    _set_help(s, "max_new_tokens", 128, "most tokens of the summary (default 128); a long input's parts get as "
              "many, or fewer on a short context (at most half of what one combining call takes)")
    s.set_defaults(fn=cmd_summarize)

    q = apps.add_parser("qa", parents=[common], help="answer a question from a context (files or a data set)",
                        description="Answer QUESTION from the context: --context files and/or --context-data, a "
                        "data set in the store (its records in order). The context must fit the model's context "
                        "with the question and the answer.")
    q.add_argument("question", nargs="?", default=None, metavar="QUESTION",
                   help="the question (default: read from stdin)")
    q.add_argument("--context", action="append", default=None, metavar="FILE",
                   help="a file of context (repeatable; - is stdin; default: none)")
    q.add_argument("--context-data", default=None, metavar="NAME",
                   help="a data set in the store (/data/NAME, `llmos data import`) whose records are the context "
                   "(default: none; give it or --context)")
    _app_flags(q, JSON_HELP + " plus question")
    q.set_defaults(fn=cmd_qa)

    c = apps.add_parser("chat", parents=[common], help="a dialogue: each input line a turn, each reply streamed",
                        description="A session (its context kept between turns) with a system prompt; each line "
                        "of the files or stdin is a user turn, and its reply streams to stdout, then a newline. Ends "
                        "at end of input or /exit; empty lines are skipped.")
    c.add_argument("files", nargs="*", metavar="FILE", help="files of turns, one a line (- is stdin; default: stdin)")
    from llmos.apps.chat import SYSTEM

    c.add_argument("--system", default=SYSTEM, help=f"the system prompt ('' for none; default: {SYSTEM!r})")
    add_generation_flags(c)
    c.add_argument("-v", "--verbose", action="store_true", help="print the session's pid to stderr")
    c.add_argument("--json", action="store_true", help="print each turn, once it ends, as one line of JSON: "
                   "{pid, text, finish_reason, stats, error}")
    c.set_defaults(fn=cmd_chat)

    g = apps.add_parser("generate", parents=[common], help="generate text from the input (an instruction, or a "
                        "text to continue with --raw)",
                        description="Send the input as a user message (the model does what it asks), or with --raw "
                        "as a plain prompt the model continues; the text streams to stdout.")
    g.add_argument("files", nargs="*", metavar="FILE", help=FILES_HELP)
    g.add_argument("--raw", action="store_true", help="continue the input as plain text, without the chat template")
    _app_flags(g, JSON_HELP)
    g.set_defaults(fn=cmd_generate)
