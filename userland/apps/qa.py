"""``llmos app qa``: an answer to a question from a given context (files, or a data set in the store).

Prompt (one user message, rendered by the model's chat template)::

    Answer the question using only the context below. If the context does not hold the answer, say so.

    Context:
    {context}

    Question: {question}

For a model without a chat template, the plain prompt: the same text, then ``\\nAnswer:`` after the question.
A data set's context (``--context-data NAME``: /data/NAME) is its records in order, one paragraph each. The
context goes in one prompt: it must fit the model's context with the answer (E2BIG otherwise).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmos.apps.base import AppModel, Prompt, Write, user_prompt
from llmos.syscalls.errors import InvalidArgument, TooBig, quote

if TYPE_CHECKING:
    from llmos.client import Client

INSTRUCTION = "Answer the question using only the context below. If the context does not hold the answer, say so."
MAX_DATA_BYTES = 16 * 2**20  # a data set read as a context at most (no model's context holds more)


def qa_prompt(context: str, question: str) -> Prompt:
    """The prompt that answers ``question`` from ``context``."""
    body = f"{INSTRUCTION}\n\nContext:\n{context}\n\nQuestion: {question}"
    return user_prompt(body, body + "\nAnswer:")


def data_context(client: "Client", name: str) -> str:
    """The context a data set gives: its records in order, one paragraph each. NotFound (no such data set),
    TooBig (E2BIG: over MAX_DATA_BYTES, more than any model's context), InvalidArgument (a bad name)."""
    meta = client.data.stat(name)
    if meta["bytes"] > MAX_DATA_BYTES:
        raise TooBig(f"data set {quote(name)} is {meta['bytes']} bytes: more than a context can hold (at most "
                     f"{MAX_DATA_BYTES} bytes are read)")
    return "\n\n".join(r.strip() for r in client.data.iter(name) if r.strip())


def answer(app: AppModel, context: str, question: str, write: Write | None = None) -> str:
    """Answer ``question`` from ``context`` on ``app``'s model, streaming to ``write``; returns the answer.
    InvalidArgument for an empty question or context; the kernel's errors as AppModel.run."""
    if not question.strip():
        raise InvalidArgument("no question: give it as an argument or on stdin")
    if not context.strip():
        raise InvalidArgument("the context is empty")
    return app.run(qa_prompt(context.strip(), question.strip()), write, purpose="answer").text
