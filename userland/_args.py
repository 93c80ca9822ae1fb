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


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    """The spawn flags ``run`` and ``chat`` share; types and ranges from the syscall table."""
    parser.add_argument("--model", default=None, help="model directory (default: the shipped default model)")
    parser.add_argument("--max-new-tokens", type=syscall_arg("spawn", "max_new_tokens"), default=128,
                        help="most tokens to generate (default 128; per turn in chat)")
    parser.add_argument("-p", "--priority", type=syscall_arg("spawn", "priority"), default=0,
                        help="nice value -20..19, lower runs first (below 0 only the admin)")
    parser.add_argument("--temperature", type=syscall_arg("spawn", "temperature"), default=None,
                        help="sampling temperature (default 0.8: every run differs; --temperature 0 repeats a run)")
    parser.add_argument("--top-p", type=syscall_arg("spawn", "top_p"), default=None, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=syscall_arg("spawn", "top_k"), default=None,
                        help="keep the k most likely tokens (0: off)")
    parser.add_argument("--seed", type=syscall_arg("spawn", "seed"), default=None, help="sampling seed")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    parser.add_argument("--deadline", type=syscall_arg("spawn", "deadline"), default=None,
                        help="seconds: past them the process ends with ETIMEDOUT, keeping its output (in chat: "
                             "each turn's, from its line)")
    parser.add_argument("--queue-timeout", type=syscall_arg("spawn", "queue_timeout"), default=None,
                        help="seconds it may wait in the run queue before it first runs (then ETIMEDOUT)")
