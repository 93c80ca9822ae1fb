"""What every ``llmos`` command needs from its arguments: the kernel's address, the home, a connection.

Shared by cli.py and the command modules (cli_kernel, cli_models, cli_fs, cli_store, cli_users, cli_serve, cli_apps,
cli_bench).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llmos import embedded
from llmos.client import Client
from llmos.syscalls.address import llmos_home, resolve_address
from llmos.syscalls.errors import KernelUnavailable


def address_of(args: argparse.Namespace) -> str:
    """The kernel address for this command: --address, else the default under --home, else
    $LLMOS_ADDRESS, else the default under $LLMOS_HOME (InvalidArgument for an unusable one)."""
    return resolve_address(args.address, args.home)


def home_of(args: argparse.Namespace) -> Path:
    """The state directory: --home, else $LLMOS_HOME, else ~/.llmos."""
    return Path(args.home).expanduser().resolve() if args.home else llmos_home()


def connect(args: argparse.Namespace) -> Client:
    """A client of the running kernel; KernelUnavailable (saying how to start one) when none answers."""
    address = address_of(args)
    client = embedded.try_connect(address)
    if client is None:
        raise KernelUnavailable(f"no kernel running at {address} (start one: llmos kernel start, with the same "
                                f"--home or --address)")
    return client
