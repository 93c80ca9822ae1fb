"""``llmos app summarize``: a summary of a text of any length, map-reduce over parts that fit the context.

Prompts (one user message, rendered by the model's chat template; the plain text for a model without one):

- a text, or one part of a long one (``{text}``)::

      Summarize the following text. Reply with the summary only.

      {text}

  plain: ``Summarize the following text.\\n\\nText:\\n{text}\\n\\nSummary:\\n``
- the summaries of consecutive parts, one paragraph each (``{summaries}``)::

      The following are summaries of consecutive parts of one document. Combine them into one summary of the
      whole document. Reply with the summary only.

      {summaries}

  plain: the same instruction, then ``\\n\\nSummaries:\\n{summaries}\\n\\nSummary:\\n``

Long inputs: the part budget is the model's context (``model_info``'s context_len) less the prompt's own
tokens (a probe: the prompt with an empty text, spawned for one token, whose prompt_tokens the kernel
reports), less the summary's room (``--max-new-tokens``), less a margin of MARGIN tokens for what a tokenizer
does at the joins. Tokens are counted by the kernel (``score``). A text within the budget is summarised in
one call, streamed. A longer one is split (llmos.apps.chunking: paragraphs, then sentences, then words),
each part summarised, and the summaries combined; summaries that together are still over the combine
prompt's budget are packed into groups, each group combined, and so on until one call takes them all: that
last call is the one streamed. Each round at least halves the summaries, because a part must hold two
summaries (else EINVAL: lower --max-new-tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from llmos.apps import chunking
from llmos.apps.base import AppModel, Prompt, Write, user_prompt
from llmos.syscalls.errors import InvalidArgument

MARGIN = 8  # tokens kept free in each part: a tokenizer may merge or split differently where texts join

SUMMARIZE = "Summarize the following text. Reply with the summary only."
COMBINE = ("The following are summaries of consecutive parts of one document. Combine them into one summary of "
           "the whole document. Reply with the summary only.")


def summarize_prompt(text: str) -> Prompt:
    """The prompt that summarises ``text`` (a whole text, or one part of a long one)."""
    return user_prompt(f"{SUMMARIZE}\n\n{text}", f"Summarize the following text.\n\nText:\n{text}\n\nSummary:\n")


def combine_prompt(summaries: str) -> Prompt:
    """The prompt that combines the summaries of consecutive parts (one paragraph each) into one."""
    return user_prompt(f"{COMBINE}\n\n{summaries}", f"{COMBINE}\n\nSummaries:\n{summaries}\n\nSummary:\n")


@dataclass
class Plan:
    """How a text was summarised: ``parts`` (the text's parts: 1 when it fit at once), ``rounds`` (combine
    rounds after the parts' summaries), the parts' budget and the context, in tokens."""

    context: int
    part_budget: int
    combine_budget: int
    parts: int = 1
    rounds: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def overhead(app: AppModel, build: Callable[[str], Prompt]) -> int:
    """The prompt's own tokens, as the kernel renders and counts them: ``build("")`` spawned for one token."""
    return app.run(build(""), purpose="probe", max_new_tokens=1, ignore_eos=True).stats.prompt_tokens


def summarize(app: AppModel, text: str, write: Write | None = None) -> tuple[str, Plan]:
    """Summarise ``text`` on ``app``'s model; the final summary's text streams to ``write``. Returns (the summary,
    the Plan); each process's purpose (probe, summary, part I/N, round R group I/N, combine) goes to
    ``app.on_pid``. Raises InvalidArgument (EINVAL) for an empty text, or a context too small for parts that
    hold two summaries; the kernel's errors as AppModel.run."""
    if not text.strip():
        raise InvalidArgument("nothing to summarize: the input is empty")
    room = int(app.params.get("max_new_tokens") or 128)
    context = int(app.info().get("context_len") or 0)
    part_budget = context - overhead(app, summarize_prompt) - room - MARGIN
    whole = app.count(text)
    if whole <= part_budget:
        return app.run(summarize_prompt(text.strip()), write, purpose="summary").text, Plan(context, part_budget, 0)
    plan = Plan(context, part_budget, context - overhead(app, combine_prompt) - room - MARGIN)
    least = min(plan.part_budget, plan.combine_budget)
    if least < 2 * (room + MARGIN):  # a part must hold two summaries, or combining them would never end
        raise InvalidArgument(f"the text is {whole} tokens, more than the model's context ({context} tokens) holds "
                              f"with the prompt and a summary of {room} tokens; to summarise it in parts, each part "
                              f"must hold two summaries: use --max-new-tokens "
                              f"{max(1, (least + room - 2 * MARGIN) // 3)} or less")
    parts = chunking.split(text, plan.part_budget, app.count, chunking.ratio_estimate(text, whole))
    plan.parts = len(parts)
    summaries = []
    for i, part in enumerate(parts, 1):
        summaries.append(app.run(summarize_prompt(part), purpose=f"part {i}/{len(parts)}").text)

    def combine(summaries_text: str, label: str) -> str:
        return app.run(combine_prompt(summaries_text), write if label == "combine" else None, purpose=label).text

    final, plan.rounds = combine_all(summaries, plan.combine_budget, app.count, combine)
    return final, plan


def combine_all(summaries: list[str], budget: int, count: Callable[[str], int],
                combine: Callable[[str, str], str]) -> tuple[str, int]:
    """Combine ``summaries`` (in order) into one: while they do not fit ``budget`` tokens together (blank lines
    between them), pack them into groups that do and combine each group (``combine(text, label)`` returns
    the combined summary; ``label`` is "round R group I/N"); then one last ``combine(text, "combine")``.
    Each summary is first cut to half the budget less MARGIN, so that a group holds two and each round at least
    halves them. Returns (the last combine's text, the rounds: 1 when the summaries fit at once)."""
    rounds = 0
    while True:
        rounds += 1
        items = [_unit(s.strip(), budget // 2 - MARGIN, count) for s in summaries if s.strip()]
        groups = chunking.pack(items, budget, count) if items else [""]
        if len(groups) == 1:
            return combine(groups[0], "combine"), rounds
        if len(groups) >= len(items):  # cannot be while two cut summaries fit a group; never loop on it
            raise InvalidArgument(f"{len(items)} summaries do not fit fewer groups of {budget} tokens: lower "
                                  "--max-new-tokens")
        summaries = [combine(g, f"round {rounds} group {i}/{len(groups)}") for i, g in enumerate(groups, 1)]


def _unit(summary: str, limit: int, count: Callable[[str], int]) -> chunking.Unit:
    """A summary as a unit to combine, cut to ``limit`` tokens: a summary is at most --max-new-tokens tokens as
    generated, but its text may count more once tokenised again (bytes of a broken character come back as
    U+FFFD, three bytes), and every group must hold two summaries for the rounds to end."""
    n = count(summary)
    if n > limit:
        summary = chunking.cut(summary, limit, count)[0]
        n = count(summary)
    return chunking.Unit(summary, n, chunking.PARAGRAPH_SEP)
