"""Checks on a prompt before it is tokenised or run, shared by the engine and the kernel (no torch needed here)."""

from __future__ import annotations

from typing import Any, Sequence

from llmos.syscalls.errors import InvalidArgument, TooBig, quote


def check_prompt_ids(prompt_ids: Sequence, vocab_size: int, context_len: int) -> list[int]:
    """The ids as a list, or TooBig (no room left in the context for one generated token), checked first
    and in O(1), or InvalidArgument (empty, not ints, out of the vocabulary). The items are checked in
    one pass of C loops (a million ids in ~0.1 s), not formatted one by one."""
    if not prompt_ids:
        raise InvalidArgument(f"prompt_ids must be a non-empty list of token ids in [0, {vocab_size}); "
                              "got an empty list")
    check_length(len(prompt_ids), context_len)
    ids = list(prompt_ids)
    if not set(map(type, ids)) <= {int} or min(ids) < 0 or max(ids) >= vocab_size:  # bool is not an int here
        i, bad = next((i, t) for i, t in enumerate(ids) if type(t) is not int or not 0 <= t < vocab_size)
        raise InvalidArgument(f"prompt_ids must be a non-empty list of token ids in [0, {vocab_size}); "
                              f"item {i} is {quote(bad)}")
    return ids


def check_length(tokens: int, context_len: int) -> None:
    """TooBig when a prompt of ``tokens`` tokens leaves no room in the context for one generated token."""
    if tokens >= context_len:
        raise TooBig(f"prompt is {tokens} tokens; the model's context holds {context_len} "
                     "(and at least one token must be generated)")


def text_chars(value: Any) -> int:
    """Characters of every string in ``value``, map keys included, at any depth: what a chat template
    could render of a message. Iterative: a deeply nested value cannot exhaust the stack."""
    total, todo = 0, [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            todo.extend(v.keys())
            todo.extend(v.values())
        elif isinstance(v, (list, tuple)):
            todo.extend(v)
    return total


def chars_cap(max_chars: int, context_len: int | None) -> str:
    """How a character cap reads in an error: in tokens, which is what the user knows of the model."""
    if not context_len:
        return f"at most {max_chars} characters fit the model's context"
    return (f"the model's context is {context_len} tokens, so at most {max_chars} characters ({context_len} tokens "
            f"of at most {max_chars // context_len} characters) could fit")


def check_prompt_chars(prompt: str | None, messages: list | None, max_chars: int,
                       context_len: int | None = None) -> None:
    """TooBig when a text prompt, or every string of the chat messages together (roles, contents and
    any other field a template may render), has more characters than ``max_chars`` (the model's
    context, ``context_len`` tokens, times its longest token, in characters): such a prompt cannot fit,
    and is refused before the tokenizer spends seconds on it."""
    if not max_chars:
        return
    if prompt is not None and len(prompt) > max_chars:
        raise TooBig(f"prompt is {len(prompt)} characters; {chars_cap(max_chars, context_len)}")
    if messages is not None:
        total = text_chars(messages)
        if total > max_chars:
            raise TooBig(f"messages hold {total} characters (roles, contents and every other field); "
                         f"{chars_cap(max_chars, context_len)}")
