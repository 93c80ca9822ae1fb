"""A line-by-line chat over a session: each line read is a turn, its reply streams out.

Shared by ``llmos chat`` and the shell's ``chat`` sub-mode; the caller owns the session (a ``with``
closes it) and says where lines come from and where text goes.
"""

from __future__ import annotations

import json
from typing import Callable

from llmos._wire import text_or_raise
from llmos.session import Session
from llmos.types import TurnResult

EXIT_WORDS = ("/exit", "/quit")


def turn_json(turn: TurnResult) -> str:
    """One turn as one line of JSON: {pid, text, finish_reason, stats, error} (error null unless the turn
    failed); the reply's own newlines are escaped, so a reader splits turns at line ends."""
    return json.dumps({"pid": turn.pid, "text": turn.text, "finish_reason": turn.finish_reason,
                       "stats": turn.stats.__dict__, "error": turn.error})


def chat_loop(session: Session, read: Callable[[], str | None], write: Callable[[str], None], *,
              empty_ends: bool, as_json: bool = False) -> int:
    """Send each line ``read`` returns as a turn and ``write`` the reply as it streams, then a newline
    (``as_json``: once the turn ends, its :func:`turn_json` line instead).

    Ends at end of input (``read`` returns None), at ``/exit``, or at an empty line when ``empty_ends``
    (empty lines are skipped otherwise). A turn that ends in an error (a deadline...) is raised as its
    llmos error (in JSON, after its line). Returns the number of turns sent.
    """
    turns = 0
    while True:
        line = read()
        if line is None:
            return turns
        text = line.rstrip("\r\n")
        if text.strip() in EXIT_WORDS:
            return turns
        if not text.strip():
            if empty_ends:
                return turns
            continue
        turns += 1
        if as_json:
            session.last = session.client.write(session.pid, text)
            write(turn_json(session.last) + "\n")
            text_or_raise(session.last)
            continue
        try:
            for chunk in session.stream(text):
                write(chunk)
        finally:
            write("\n")  # the reply's line ends, even when the turn failed
