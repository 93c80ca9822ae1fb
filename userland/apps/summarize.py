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

Long inputs: a text fits at once when its tokens are at most the model's context (``model_info``'s
context_len) less the prompt's own tokens (a probe: the prompt with an empty text, spawned for one token,
whose prompt_tokens the kernel reports), less the summary's room (``--max-new-tokens``), less a margin of
MARGIN tokens for what a tokenizer does at the joins; it is then summarised in one call, streamed. Tokens are
counted by the kernel (``score``). A longer text is split (llmos.apps.chunking: paragraphs, then sentences,
then words), each part summarised, and the summaries combined; summaries that together are still over the
combine prompt's budget are packed into groups, each group combined, and so on until one call takes them all:
that last call, with the full --max-new-tokens, is the one streamed. Each round at least halves the
summaries, because two fit one combine: the parts' and intermediate summaries get at most half the combine
budget less MARGIN (fewer tokens than --max-new-tokens on a short context; EINVAL when that leaves less than
MIN_PART_ROOM), and the parts are sized for that room.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from llmos.apps import chunking
from llmos.apps.base import AppModel, Prompt, Write, user_prompt
from llmos.syscalls.errors import InvalidArgument

MARGIN = 8  # tokens kept free in each part: a tokenizer may merge or split differently where texts join
MIN_PART_ROOM = 16  # tokens: a part's summary shorter than this says too little to combine

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
    """How a text was summarised, in tokens: the model's ``context``; ``part_budget`` (a part's most) and
    ``combine_budget`` (the summaries one combine takes, at most); ``part_room`` (the most each part's summary,
    and each intermediate one, may have: --max-new-tokens, less if two of them would not fit a combine);
    ``parts`` (1: the text fit at once) and ``rounds`` (combine calls' rounds; 0 when it fit at once)."""

    context: int
    part_budget: int
    combine_budget: int = 0
    part_room: int = 0
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
    ``app.on_spawn``. Raises InvalidArgument (EINVAL) for an empty text, or a context too small to combine two
    summaries; the kernel's errors as AppModel.run."""
    if not text.strip():
        raise InvalidArgument("nothing to summarize: the input is empty")
    room = int(app.params.get("max_new_tokens") or 128)
    context = int(app.info().get("context_len") or 0)
    own = overhead(app, summarize_prompt)
    part_budget = context - own - room - MARGIN
    whole = app.count(text)
    if whole <= part_budget:
        return app.run(summarize_prompt(text.strip()), write, purpose="summary").text, Plan(context, part_budget)
    combine_budget = context - overhead(app, combine_prompt) - room - MARGIN
    # the parts' summaries may be shorter than the final one: two of them (cut to half the budget) must fit a
    # combine, or the rounds would never end
    part_room = min(room, combine_budget // 2 - MARGIN)
    plan = Plan(context, context - own - part_room - MARGIN, combine_budget, part_room)
    if part_room < min(room, MIN_PART_ROOM) or plan.part_budget < part_room:
        raise InvalidArgument(f"the text is {whole} tokens, more than the model's context ({context} tokens) holds "
                              f"with the prompt and a summary of {room} tokens, and the context is too small to "
                              "summarise it in parts and combine them: lower --max-new-tokens, or use a model with "
                              "a longer context")
    parts = chunking.split(text, plan.part_budget, app.count, chunking.ratio_estimate(text, whole))
    plan.parts = len(parts)
    summaries = [app.run(summarize_prompt(part), purpose=f"part {i}/{len(parts)}", max_new_tokens=part_room).text
                 for i, part in enumerate(parts, 1)]

    def combine(summaries_text: str, label: str) -> str:
        last = label == "combine"
        return app.run(combine_prompt(summaries_text), write if last else None, purpose=label,
                       max_new_tokens=room if last else part_room).text

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
