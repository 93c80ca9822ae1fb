"""``llmos serve`` (the OpenAI-compatible gateway, llmos.gateway) and ``llmos api-key add|ls|rm`` (its keys).

With no API key configured the gateway serves a loopback host only, every request as the gateway's own
user (or as `anonymous` when that user is the kernel's admin); with keys at start, each request is its
key's user, and keys stay required even if all are removed. docs/gateway.md says how, and what is supported.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import socket
import sys
from typing import Any

from llmos._args import int_in
from llmos._command import address_of, home_of
from llmos.gateway import apikeys

EXIT_USAGE = 2
DEFAULT_MAX_CHOICES = 64  # llmos.gateway.app's, copied: `llmos --help` stays free of FastAPI (a test: equal)


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback one (127.0.0.0/8, ::1; 'localhost' as it resolves)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def cmd_serve(args: argparse.Namespace) -> int:
    keys_file = apikeys.keys_file(home_of(args))
    has_keys = bool(apikeys.load(keys_file))
    if not has_keys and not is_loopback(args.host):
        print(f"llmos serve: no API keys in {keys_file}: without them the gateway serves only a loopback host "
              f"(127.0.0.1, ::1, localhost), not {args.host!r}. Make one with `llmos api-key add USER`, or serve "
              f"--host 127.0.0.1", file=sys.stderr)
        return EXIT_USAGE
    import uvicorn

    from llmos.cli import Terminated
    from llmos.gateway.app import GatewayConfig, create_app

    app = create_app(GatewayConfig(address_of(args), keys_file, args.max_tokens,
                                   require_keys=has_keys or not is_loopback(args.host), max_choices=args.max_choices))
    who = f"API keys from {keys_file}" if has_keys else "no API keys: loopback only"
    print(f"llmos serve: http://{args.host}:{args.port}/v1 ({who}); kernel at {address_of(args)}", file=sys.stderr,
          flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.grace))
    try:
        server.run()
    except Terminated:  # uvicorn stopped on SIGTERM and passed it on to llmos's handler: a clean stop
        return 0
    return 0 if server.started else 1


def cmd_api_key_add(args: argparse.Namespace) -> int:
    key, entry = apikeys.add(apikeys.keys_file(home_of(args)), args.user)
    if args.json:
        print(json.dumps({"key": key, "user": entry.user, "id": entry.id, "created": entry.created}))
    else:
        print(key)
        print(f"API key {entry.id} for {entry.user}: shown once, stored only as its SHA-256; the gateway takes it "
              f"as 'Authorization: Bearer KEY'", file=sys.stderr)
    return 0


def cmd_api_key_ls(args: argparse.Namespace) -> int:
    keys = apikeys.load(apikeys.keys_file(home_of(args)))
    if args.json:
        print(json.dumps([{"user": k.user, "id": k.id, "created": k.created} for k in keys]))
        return 0
    if not keys:
        print("no API keys (llmos api-key add USER): the gateway serves loopback only, as its own user")
        return 0
    print(f"{'USER':<24} {'ID':<13} CREATED")
    for k in keys:
        print(f"{k.user:<24} {k.id:<13} {datetime.datetime.fromtimestamp(k.created).strftime('%Y-%m-%d %H:%M')}")
    return 0


def cmd_api_key_rm(args: argparse.Namespace) -> int:
    removed = apikeys.remove(apikeys.keys_file(home_of(args)), args.user, args.id)
    if args.json:
        print(json.dumps({"user": args.user, "removed": removed}))
    else:
        print(f"user {args.user}: {removed} API key{'s' if removed != 1 else ''} withdrawn")
    return 0


_port = int_in(1, 65535, "a port number")
_max_choices = int_in(1)


def _max_tokens(text: str) -> int:
    from llmos._args import syscall_arg

    return syscall_arg("spawn", "max_new_tokens")(text)


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``serve`` and ``api-key`` (add, ls, rm) to ``llmos``."""
    s = sub.add_parser("serve", parents=[common], help="the OpenAI-compatible HTTP gateway (/v1/completions, "
                       "/v1/chat/completions, /v1/models, /health, /metrics)",
                       description="Serve the OpenAI API over HTTP on the running kernel. Without API keys "
                       "(llmos api-key add USER) it serves a loopback host only, every request as your user (as "
                       "'anonymous' when you are the kernel's admin); with keys each request is its key's user, and "
                       "keys stay required. Stops on Ctrl-C or SIGTERM, ending the processes of requests still "
                       "open. docs/gateway.md has the details.")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; another than "
                   "loopback needs API keys)")
    s.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    s.add_argument("--max-tokens", type=_max_tokens, default=None, metavar="N",
                   help="output limit in tokens of a request that sets neither max_tokens nor max_completion_tokens "
                   "(default: the kernel's, 128)")
    s.add_argument("--max-choices", type=_max_choices, default=DEFAULT_MAX_CHOICES, metavar="N",
                   help="most processes one request may start: its prompts x n (default "
                   f"{DEFAULT_MAX_CHOICES}); more is a 400 that names the limit")
    s.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                   help="on stop, seconds open requests may take to finish before they are cut (default 10)")
    s.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                   help="the HTTP server's log level on stderr (default warning; info logs every request)")
    s.set_defaults(fn=cmd_serve)

    k = sub.add_parser("api-key", help="the gateway's API keys: each stands for an LLMOS user (add, ls, rm)",
                       description="API keys of `llmos serve`, in HOME/gateway/api_keys.json (0600; only each "
                       "key's SHA-256 is stored). A running gateway sees changes at once.")
    ksub = k.add_subparsers(dest="action", required=True)
    ad = ksub.add_parser("add", parents=[common], help="make a key for USER and print it (once: it is not stored)")
    ad.add_argument("user", metavar="USER", help="the LLMOS user whose requests the key makes")
    ad.add_argument("--json", action="store_true", help="print {key, user, id, created} as JSON")
    ad.set_defaults(fn=cmd_api_key_add)
    ls = ksub.add_parser("ls", parents=[common], help="list the keys: user, id, creation time (never the keys)")
    ls.add_argument("--json", action="store_true", help="print a JSON list of {user, id, created}")
    ls.set_defaults(fn=cmd_api_key_ls)
    rm = ksub.add_parser("rm", parents=[common], help="withdraw USER's keys (all, or --id ID); a running gateway "
                         "refuses them at once")
    rm.add_argument("user", metavar="USER", help="the user whose keys are withdrawn")
    rm.add_argument("--id", default=None, metavar="ID", help="only the key with this id (from api-key ls; "
                    "default: all of USER's)")
    rm.add_argument("--json", action="store_true", help="print {user, removed} as JSON")
    rm.set_defaults(fn=cmd_api_key_rm)
