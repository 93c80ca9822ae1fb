"""``llmos app translate``: the input translated into another language, streamed as generated.

Prompt (one user message, rendered by the model's chat template)::

    Translate the following text from {source} into {target}. Reply with the translation only.

    {text}

Without ``--from`` the first line says "Translate the following text into {target}.". For a model without a
chat template, the plain prompt: ``Translate the following text[ from {source}] into {target}.\\n\\nText:\\n
{text}\\n\\n{target} translation:\\n``. Languages are English names or ISO 639-1 codes (llmos.apps.languages).
The text goes in one prompt: it must fit the model's context with the translation (E2BIG otherwise).
"""

from __future__ import annotations

from llmos.apps.base import AppModel, Prompt, Write, user_prompt
from llmos.apps.languages import language
from llmos.syscalls.errors import InvalidArgument


def translate_prompt(text: str, target: str, source: str | None = None) -> Prompt:
    """The prompt that translates ``text`` into ``target`` (from ``source``, None: whatever it is written in).
    Languages as :func:`llmos.apps.languages.language` takes them (InvalidArgument for an unknown one)."""
    target = language(target)
    where = f" from {language(source)} into {target}" if source else f" into {target}"
    return user_prompt(f"Translate the following text{where}. Reply with the translation only.\n\n{text}",
                       f"Translate the following text{where}.\n\nText:\n{text}\n\n{target} translation:\n")


def translate(app: AppModel, text: str, target: str, source: str | None = None, write: Write | None = None) -> str:
    """Translate ``text`` on ``app``'s model, streaming to ``write``; returns the translation. InvalidArgument
    for an empty text or an unknown language; the kernel's errors as AppModel.run (TooBig: over the context)."""
    if not text.strip():
        raise InvalidArgument("nothing to translate: the input is empty")
    return app.run(translate_prompt(text.strip(), target, source), write, purpose="translation").text
