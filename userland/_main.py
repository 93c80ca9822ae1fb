"""The console entry points of ``llmos`` and ``llmos-shell``.

They import the command inside a ``try``: a Ctrl-C while Python is still importing it ends the
command quietly with exit status 130, as it does once the command runs, never with a traceback.
"""

from __future__ import annotations


def cli() -> int:
    try:
        from llmos.cli import main
    except KeyboardInterrupt:
        return 130
    return main()


def shell() -> int:
    try:
        from llmos.shell import main
    except KeyboardInterrupt:
        return 130
    return main()
