"""``llmos app generate``: text generated from the input, streamed as generated.

Prompt: the input as one user message, as it is (no instruction added), rendered by the model's chat
template: the model does what the input asks ("Write a haiku about the sea."). For a model without a chat
template, or with ``--raw``, the input is the plain prompt, and the model continues it.
"""

from __future__ import annotations

from llmos.apps.base import AppModel, Prompt, Write, user_prompt
from llmos.syscalls.errors import InvalidArgument


def generate_prompt(text: str) -> Prompt:
    """The prompt for ``text``: itself, as a user message (stripped), or as plain text (its line end dropped: the
    model continues the text's last line)."""
    return user_prompt(text.strip(), text.rstrip("\r\n"))


def generate(app: AppModel, text: str, write: Write | None = None, raw: bool = False) -> str:
    """Generate from ``text`` on ``app``'s model, streaming to ``write``; ``raw``: the plain text prompt even when
    the model has a chat template. Returns the text. InvalidArgument for an empty input."""
    if not text.strip():
        raise InvalidArgument("nothing to generate from: the input is empty")
    if raw:
        app.chat_template = False
    return app.run(generate_prompt(text), write, purpose="generation").text
