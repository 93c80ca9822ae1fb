"""``llmos whoami``, ``llmos keygen`` and ``llmos user add|ls|rm``: identity and the CURVE keys of tcp clients.

Over ipc the kernel knows a user by the uid of the process; over tcp by the CURVE key the client holds.
A user who will call a kernel over tcp runs ``llmos keygen`` (a key pair in $LLMOS_HOME/keys) and sends
the public file to the kernel's admin, who runs ``llmos user add NAME --key FILE``; the admin sends back
the kernel's public key (its home's keys/kernel.key), which the user names with ``--server-key`` or
$LLMOS_SERVER_KEY. docs/operations.md walks through it.
"""

from __future__ import annotations

import argparse
import datetime
import json
from typing import Any

from llmos._command import connect
from llmos.syscalls.address import llmos_home
from llmos.syscalls.keys import keys_dir, make_key_pair, read_key_pair


def cmd_whoami(args: argparse.Namespace) -> int:
    with connect(args) as c:
        k = c.kernel
        if args.json:
            print(json.dumps({"user": k.get("user"), "admin": k.get("admin"), "transport": k.get("transport"),
                              "address": c.address}))
        else:
            print(f"{k.get('user')}{' (admin)' if k.get('admin') else ''} via {k.get('transport')} at {c.address}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    directory = keys_dir(llmos_home())
    secret = directory / "client.key_secret"
    existed = secret.exists()
    if existed and args.force:
        secret.unlink()
        (directory / "client.key").unlink(missing_ok=True)
        existed = False
    public_file, secret_file = make_key_pair(directory, "client")
    public, _ = read_key_pair(secret_file)
    if args.json:
        print(json.dumps({"public_file": str(public_file), "secret_file": str(secret_file),
                          "key": public.decode("ascii"), "created": not existed}))
        return 0
    print(f"{'your key pair (already there; --force makes a new one)' if existed else 'new key pair'}:")
    print(f"  public: {public_file}  ({public.decode('ascii')})")
    print(f"  secret: {secret_file}  (0600: never share it)")
    print(f"send the public file to the kernel's admin, who runs:  llmos user add YOUR_NAME --key {public_file.name}")
    return 0


def cmd_user_add(args: argparse.Namespace) -> int:
    with connect(args) as c:
        entry = c.user_add(args.name, args.key)
    if args.json:
        print(json.dumps(entry))
    else:
        print(f"user {entry['user']}: key {entry['fingerprint']} authorised (tcp clients holding its secret key "
              f"are {entry['user']})")
    return 0


def cmd_user_ls(args: argparse.Namespace) -> int:
    with connect(args) as c:
        keys = c.user_list()
    if args.json:
        print(json.dumps(keys))
        return 0
    if not keys:
        print("no authorised keys (llmos user add NAME --key FILE)")
        return 0
    print(f"{'USER':<20} {'FINGERPRINT':<17} {'ADDED':<17} KEY")
    for k in keys:
        added = datetime.datetime.fromtimestamp(k["added"]).strftime("%Y-%m-%d %H:%M")
        print(f"{k['user']:<20} {k['fingerprint']:<17} {added:<17} {k['key']}")
    return 0


def cmd_user_rm(args: argparse.Namespace) -> int:
    with connect(args) as c:
        removed = c.user_remove(args.name, args.key)
    if args.json:
        print(json.dumps({"user": args.name, "removed": removed}))
        return 0
    print(f"user {args.name}: {removed} key{'s' if removed != 1 else ''} withdrawn")
    return 0


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``whoami``, ``keygen`` and ``user`` (add, ls, rm) to the ``llmos`` parser's subcommands."""
    w = sub.add_parser("whoami", parents=[common], help="who the kernel knows you as, and how it knows")
    w.add_argument("--json", action="store_true", help="one JSON object: user, admin, transport, address")
    w.set_defaults(fn=cmd_whoami)
    kg = sub.add_parser("keygen", parents=[common], help="make your CURVE key pair for tcp kernels "
                        "($LLMOS_HOME/keys/client.key and client.key_secret)")
    kg.add_argument("--force", action="store_true", help="replace the key pair you have (kernels that authorised "
                    "the old public key refuse the new one until their admin adds it)")
    kg.add_argument("--json", action="store_true", help="one JSON object: public_file, secret_file, key, created")
    kg.set_defaults(fn=cmd_keygen)
    u = sub.add_parser("user", help="the admin's: authorise CURVE keys of tcp clients (add, ls, rm)",
                       description="Who may call the kernel over tcp: each authorised public key stands for a user. "
                       "Over ipc the kernel knows users by uid and needs no keys.")
    usub = u.add_subparsers(dest="action", required=True)
    ad = usub.add_parser("add", parents=[common], help="authorise a public key for user NAME")
    ad.add_argument("name", metavar="NAME", help="the user the key stands for")
    ad.add_argument("--key", required=True, metavar="FILE", help="the user's public key file (from llmos keygen) "
                    "or its 40 Z85 characters")
    ad.add_argument("--json", action="store_true", help="print the new entry as JSON")
    ad.set_defaults(fn=cmd_user_add)
    ls = usub.add_parser("ls", parents=[common], help="list the authorised keys and their users")
    ls.add_argument("--json", action="store_true", help="one JSON list of {user, key, fingerprint, added}")
    ls.set_defaults(fn=cmd_user_ls)
    rm = usub.add_parser("rm", parents=[common], help="withdraw a user's keys (open connections lose them too)")
    rm.add_argument("name", metavar="NAME", help="the user whose keys are withdrawn")
    rm.add_argument("--key", default=None, metavar="KEY", help="only this key (Z85 or fingerprint; default: all)")
    rm.add_argument("--json", action="store_true", help="print {user, removed}: removed is the keys withdrawn")
    rm.set_defaults(fn=cmd_user_rm)
