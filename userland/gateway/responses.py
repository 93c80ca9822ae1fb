"""OpenAI's response bodies and stream chunks, built from a run's outcomes (pure functions: no I/O).

Finish reasons: the kernel's ``stop`` and ``length`` are OpenAI's; ``killed`` (a TERM or KILL, from the
owner or the admin) and ``closed`` (a session closed) become ``stop``, the one an OpenAI client takes as
"the text is complete as far as it goes"; every choice also carries ``llmos_finish_reason``, the kernel's
own. A process that ended with an error is never a choice: the request fails with the error's status.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from llmos.gateway.runs import Outcome

FINISH: dict[str, str] = {"stop": "stop", "length": "length", "killed": "stop", "closed": "stop"}


def finish_reason(kernel_reason: str) -> str:
    """OpenAI's finish reason ("stop" or "length") for the kernel's (stop, length, killed, closed). ``error``
    never reaches here: such a choice fails the request (errors.of_outcome)."""
    return FINISH.get(kernel_reason, "stop")


def usage(outcomes: list[Outcome], n: int) -> dict[str, Any]:
    """OpenAI's usage: the prompt counted once per prompt (not per choice), the outputs of every choice;
    ``prompt_tokens_details.cached_tokens``: a session turn's context the kernel already held."""
    prompt = sum(o.prompt_tokens for o in outcomes[::n])
    cached = sum(o.cached_tokens for o in outcomes[::n])
    out = sum(o.output_tokens for o in outcomes)
    return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out,
            "prompt_tokens_details": {"cached_tokens": cached}}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


DONE = sse("[DONE]")


class Shape:
    """The bodies of one endpoint's response: ``chat`` (chat.completion) or not (text_completion).
    ``session``: the session pid the reply belongs to; every body and stream chunk then says it
    (``"session": pid``), so that a streaming client learns the pid of the session it opened."""

    def __init__(self, chat: bool, model: str, include_usage: bool = False, session: int | None = None) -> None:
        self.chat, self.model, self.include_usage, self.session = chat, model, include_usage, session
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self._started: set[int] = set()

    def _head(self, stream: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        head: dict[str, Any] = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        if self.session is not None:
            head["session"] = self.session
        return head

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        body = {**self._head(True), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None  # as OpenAI: null on every chunk but the last
        return body

    def delta(self, index: int, text: str) -> dict[str, Any]:
        """A stream chunk with new text of choice ``index`` (a chat choice's first says the role)."""
        if not self.chat:
            return self._chunk({"index": index, "text": text, "logprobs": None, "finish_reason": None})
        delta: dict[str, Any] = {"content": text}
        if index not in self._started:
            self._started.add(index)
            delta = {"role": "assistant", "content": text}
        return self._chunk({"index": index, "delta": delta, "logprobs": None, "finish_reason": None})

    def finish(self, o: Outcome) -> dict[str, Any]:
        """The stream chunk that ends choice ``o`` with its finish reason."""
        extra = {"finish_reason": finish_reason(o.finish_reason), "llmos_finish_reason": o.finish_reason}
        if not self.chat:
            return self._chunk({"index": o.index, "text": "", "logprobs": None, **extra})
        delta = {} if o.index in self._started else {"role": "assistant", "content": ""}
        return self._chunk({"index": o.index, "delta": delta, "logprobs": None, **extra})

    def usage_chunk(self, outcomes: list[Outcome], n: int) -> dict[str, Any]:
        """stream_options.include_usage's last chunk: no choices, the usage."""
        return {**self._head(True), "choices": [], "usage": usage(outcomes, n)}

    def response(self, outcomes: list[Outcome], n: int) -> dict[str, Any]:
        """The whole (non-streamed) response (with ``session`` when it is a session's turn)."""
        choices = []
        for o in outcomes:
            c: dict[str, Any] = {"index": o.index}
            if self.chat:
                c["message"] = {"role": "assistant", "content": o.text}
                c["logprobs"] = chat_logprobs(o) if o.logprobs is not None else None
            else:
                c["text"] = o.text
                c["logprobs"] = completion_logprobs(o) if o.logprobs is not None else None
            c.update(finish_reason=finish_reason(o.finish_reason), llmos_finish_reason=o.finish_reason)
            choices.append(c)
        return {**self._head(False), "choices": choices, "usage": usage(outcomes, n)}


def completion_logprobs(o: Outcome) -> dict[str, Any]:
    """The completions API's logprobs: tokens, token_logprobs, top_logprobs (null: only the chosen tokens
    are scored), text_offset (each token's start in the text, in characters)."""
    offsets, at = [], 0
    for t in o.token_texts:
        offsets.append(at)
        at += len(t)
    return {"tokens": o.token_texts, "token_logprobs": o.logprobs, "top_logprobs": None, "text_offset": offsets}


def chat_logprobs(o: Outcome) -> dict[str, Any]:
    """The chat API's logprobs: per token {token, logprob, bytes (its text's UTF-8), top_logprobs: []}."""
    assert o.logprobs is not None
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
                        for t, lp in zip(o.token_texts, o.logprobs)], "refusal": None}
