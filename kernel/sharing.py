"""Sharing a kernel: what it listens on and how each address is secured, its keys, and the ipc group.

- Every tcp address is served with CURVE (encrypted, each client's key checked by the ZAP handler)
  unless the kernel was started with ``--insecure``, which is allowed for loopback addresses only.
- On every start the kernel makes sure of its key pair (``keys/kernel.key``, ``kernel.key_secret``,
  0600) and of its owner's client key pair (``keys/client.key_secret``), authorised for the owner, so
  the owner's own clients on this machine reach it over tcp with no setup.
- ``--group G``: the ipc socket becomes 0660 with group G and its directory 0750 with group G, the home
  0710 with group G (its members may pass through it, not list it); all else stays owner-only.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import stat
from pathlib import Path

from llmos.kernel.config import KernelConfig
from llmos.kernel.identity import CURVE, INSECURE, IPC, Keyring
from llmos.kernel.log import get_logger
from llmos.syscalls.address import check_address, ipc_path
from llmos.syscalls.errors import InvalidArgument
from llmos.syscalls.keys import authorized_dir, keys_dir, make_key_pair, read_key_pair

LOOPBACK_HOSTS = ("localhost", "[::1]")


def is_loopback(address: str) -> bool:
    """A tcp address on the loopback interface: localhost, 127.0.0.0/8 or [::1] (a name is not resolved)."""
    host = address[len("tcp://"):].rpartition(":")[0]
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen_plan(address: str, config: KernelConfig) -> list[tuple[str, str]]:
    """(address, transport) for every address the kernel serves: ``address`` first, then --listen's.
    InvalidArgument for a plain tcp address that is not loopback, or one given twice."""
    addresses = [address] + [a.strip() for a in (config.listen or "").split(",") if a.strip()]
    plan: list[tuple[str, str]] = []
    for a in addresses:
        check_address(a, "--listen" if plan else "--address")
        if a in (p[0] for p in plan):
            raise InvalidArgument(f"{a} is given twice")
        if a.startswith("ipc://"):
            plan.append((a, IPC))
        elif config.insecure:
            if not is_loopback(a):
                raise InvalidArgument(f"--insecure serves loopback addresses only (127.0.0.1, localhost, [::1]), not "
                                      f"{a}: anyone on the network could call the kernel unencrypted as anyone; "
                                      f"leave --insecure out to serve it with CURVE")
            plan.append((a, INSECURE))
        else:
            plan.append((a, CURVE))
    return plan


def ensure_keys(home: Path, owner: str) -> tuple[bytes, bytes, Keyring]:
    """The kernel's (public, secret) keys, made on the first start, and the keyring. The owner's own client key
    pair is made and authorised for the owner once, when this home has none: a key the admin withdrew later
    stays withdrawn (to rotate it, delete keys/client.key* and restart)."""
    directory = keys_dir(home)
    _, secret_file = make_key_pair(directory, "kernel")
    public, secret = read_key_pair(secret_file)
    keyring = Keyring(authorized_dir(home))
    authorized_dir(home).mkdir(mode=0o700, exist_ok=True)
    fresh = not (directory / "client.key_secret").exists()
    _, client_secret = make_key_pair(directory, "client")
    if fresh:
        keyring.add(owner, read_key_pair(client_secret)[0].decode("ascii"))
    return public, secret, keyring


def check_group(group: str | None) -> None:
    """InvalidArgument unless the kernel may give its socket to ``group`` (root may; others must be members)."""
    if group is None or os.geteuid() == 0:
        return
    gid = grp.getgrnam(group).gr_gid
    if gid not in os.getgroups() and gid != os.getegid():
        raise InvalidArgument(f"--group {group}: you are not a member of {group}, so the kernel cannot give its "
                              f"socket to it (usermod -aG {group} $USER, then log in again)")


def share_socket(address: str, group: str | None, home: Path) -> None:
    """Open the ipc socket of ``address`` to ``group``'s members: the socket 0660, HOME/run 0750 and HOME 0710,
    all with that group. No other directory is changed: a socket elsewhere, or a directory further up that
    keeps the members out, is logged as a warning (group_cannot_reach_socket) with the fix."""
    path = ipc_path(address)
    if path is None or group is None:
        return
    gid = grp.getgrnam(group).gr_gid
    os.chown(path, -1, gid)
    os.chmod(path, 0o660)
    log = get_logger("kernel")
    opened = {home / "run": 0o750, home: 0o710}  # the kernel's own directories, and only those
    for parent in path.parents:
        st = parent.stat()
        if parent in opened and st.st_uid == os.geteuid():
            os.chown(parent, -1, gid)
            os.chmod(parent, opened[parent])
            continue
        if (st.st_gid == gid and st.st_mode & stat.S_IXGRP) or st.st_mode & stat.S_IXOTH:
            continue
        log.warning("group_cannot_reach_socket", group=group, directory=str(parent),
                    fix=f"chmod o+x {parent}, or choose a --home its members can reach (e.g. under /srv) and the "
                        f"default socket in it")
        break
