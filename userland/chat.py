"""A line-by-line chat over a session: each line read is a turn, its reply streams out.

Shared by ``llmos chat`` and the shell's ``chat`` sub-mode; the caller owns the session (a ``with``
closes it) and says where lines come from and where text goes.
"""

from __future__ import annotations

from typing import Callable

from llmos.session import Session

EXIT_WORDS = ("/exit", "/quit")


def chat_loop(session: Session, read: Callable[[], str | None], write: Callable[[str], None], *,
              empty_ends: bool) -> int:
    """Send each line ``read`` returns as a turn and ``write`` the reply as it streams, then a newline.

    Ends at end of input (``read`` returns None), at ``/exit``, or at an empty line when ``empty_ends``
    (empty lines are skipped otherwise). A turn that ends in an error (a deadline...) is raised as its
    llmos error. Returns the number of turns sent.
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
        try:
            for chunk in session.stream(text):
                write(chunk)
        finally:
            write("\n")  # the reply's line ends, even when the turn failed
