"""Command-line argument types and flags taken from the syscall table, shared by ``llmos`` and ``llmos-shell``:
what the kernel would refuse is refused at parse time (exit 2, naming the option)."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from llmos.syscalls.errors import InvalidArgument
from llmos.syscalls.schema import check
from llmos.syscalls.table import SIGNALS, lookup

WIRE_INT = (-2**63, 2**63 - 1)  # what a MessagePack frame carries as a signed integer


def signal_name(text: str) -> str:
    """'term', 'SIGKILL', 'KILL' -> 'TERM'/'KILL'; ArgumentTypeError for a signal processes do not take."""
    name = text.upper().removeprefix("SIG")
    if name not in SIGNALS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(SIGNALS)}, got {text!r}")
    return name


def syscall_arg(call: str, name: str) -> Callable[[str], Any]:
    """An argparse type for a syscall field: the type and range come from the syscall table, so the CLI
    refuses (exit 2, naming the option) what the kernel would refuse."""
    field = next(f for f in lookup(call).request if f.name == name)
    convert = int if field.type == "int" else float

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if convert is int else 'a number'}, "
                                             f"got {text!r}") from None
        # an int the table leaves unbounded (a pid) still cannot pass 64 bits: no frame carries it
        if convert is int and field.max is None and value > WIRE_INT[1]:
            raise argparse.ArgumentTypeError(f"must be <= {WIRE_INT[1]}, got {text!r}")
        if convert is int and field.min is None and value < WIRE_INT[0]:
            raise argparse.ArgumentTypeError(f"must be >= {WIRE_INT[0]}, got {text!r}")
        try:
            return check(field, value)
        except InvalidArgument as exc:
            raise argparse.ArgumentTypeError(exc.message.replace(f"field '{name}' ", "")) from None

    return parse


def positive(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
        return value

    return parse


def int_in(lo: int, hi: int = WIRE_INT[1], what: str = "a whole number") -> Callable[[str], int]:
    """An argparse type for an integer in lo..hi, named ``what`` in its error (exit 2 naming the option)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not lo <= value <= hi:
            bound = f">= {lo}" if hi == WIRE_INT[1] else f"in {lo}..{hi}"
            raise argparse.ArgumentTypeError(f"must be {what} {bound}, got {text!r}")
        return value

    return parse


_token_id = int_in(0, what="a token id")


# spawn's sampling fields (syscalls/table.py SAMPLING) as their flags: one place names them all, and a test checks
# that every field of the table has one
SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop",
                  "stop_token_ids", "ignore_eos")


def sampling_params(args: argparse.Namespace) -> dict[str, Any]:
    """The spawn fields the flags of ``add_generation_flags`` set: the given ones only (the kernel's defaults
    stand for the rest), plus ``deadline``/``queue_timeout`` when given."""
    params: dict[str, Any] = {}
    for name in (*SAMPLING_FLAGS, "deadline", "queue_timeout"):
        value = getattr(args, name, None)
        if value is not None and value is not False and value != []:  # 0 is a value (greedy), not "unset"
            params[name] = value
    return params


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    """The spawn flags ``run`` and ``chat`` share; types and ranges from the syscall table."""
    parser.add_argument("--model", default=None, help="model directory or a store name (default: the shipped default model)")
    parser.add_argument("--max-new-tokens", type=syscall_arg("spawn", "max_new_tokens"), default=128,
                        help="most tokens to generate (default 128; per turn in chat)")
    parser.add_argument("-p", "--priority", type=syscall_arg("spawn", "priority"), default=0,
                        help="nice value -20..19, lower runs first (below 0 only the admin; default 0)")
    parser.add_argument("--temperature", type=syscall_arg("spawn", "temperature"), default=None,
                        help="sampling temperature (default 0.8: every run differs; --temperature 0 repeats a run)")
    parser.add_argument("--top-p", type=syscall_arg("spawn", "top_p"), default=None,
                        help="nucleus sampling: keep the most likely tokens whose probabilities sum to P, 0..1 "
                             "(default 0.95)")
    parser.add_argument("--top-k", type=syscall_arg("spawn", "top_k"), default=None,
                        help="keep the k most likely tokens (default 0: off)")
    parser.add_argument("--repetition-penalty", type=syscall_arg("spawn", "repetition_penalty"), default=None,
                        help="divide the odds of tokens already in the context by this, 0.01..100 (default 1: off)")
    parser.add_argument("--seed", type=syscall_arg("spawn", "seed"), default=None,
                        help="sampling seed, an integer >= 0 (default: a random one each run)")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="end the output before this text (repeatable, up to 16; default: none)")
    parser.add_argument("--stop-token-id", dest="stop_token_ids", action="append", default=None, metavar="ID",
                        type=_token_id, help="end the output at this token id (repeatable, up to 64; default: "
                        "only the end-of-sequence token)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="keep generating past the end-of-sequence token (default: stop there)")
    parser.add_argument("--deadline", type=syscall_arg("spawn", "deadline"), default=None,
                        help="seconds: past them the process ends with ETIMEDOUT, keeping its output (in chat: "
                             "each turn's, from its line; default: none)")
    parser.add_argument("--queue-timeout", type=syscall_arg("spawn", "queue_timeout"), default=None,
                        help="seconds it may wait in the run queue before it first runs (then ETIMEDOUT; default: "
                             "no limit)")
