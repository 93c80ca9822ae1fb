"""The `llmos serve` command (issue 11): being built; its module registers its subcommands here."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add this module's subcommands to ``llmos``."""
