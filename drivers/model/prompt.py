"""Checks on a prompt before it is tokenised or run, shared by the engine and the kernel (no torch needed here)."""

from __future__ import annotations

from llmos.syscalls.errors import InvalidArgument, TooBig


def check_prompt_ids(prompt_ids: list, vocab_size: int, context_len: int) -> list[int]:
    """The ids as a list, or InvalidArgument (empty, not ints, out of the vocabulary) or TooBig (no room
    left in the context for one generated token)."""
    bad = [t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
    if bad or not prompt_ids:
        raise InvalidArgument(f"prompt_ids must be a non-empty list of token ids in [0, {vocab_size}); "
                              f"got {bad[:3] if bad else 'an empty list'}")
    check_length(len(prompt_ids), context_len)
    return list(prompt_ids)


def check_length(tokens: int, context_len: int) -> None:
    if tokens >= context_len:
        raise TooBig(f"prompt is {tokens} tokens; the model's context holds {context_len} "
                     "(and at least one token must be generated)")


def check_prompt_chars(prompt: str | None, messages: list | None, max_chars: int) -> None:
    """TooBig when a text prompt, or the chat messages' content together, has more characters than
    ``max_chars`` (the model's context times its longest token, in characters): such a prompt cannot
    fit, and is refused before the tokenizer spends seconds on it."""
    if not max_chars:
        return
    if prompt is not None and len(prompt) > max_chars:
        raise TooBig(f"prompt is {len(prompt)} characters; the model's context holds at most {max_chars}")
    if messages is not None:
        total = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
        if total > max_chars:
            raise TooBig(f"messages hold {total} characters of content; the model's context holds at most "
                         f"{max_chars}")
