"""The kernel's configuration: every flag of ``llmos kernel start``, its default, range and parser.

One table (``FLAGS``) defines each setting once; ``add_flags`` turns it into argparse options
(for ``python -m llmos.kernel.main`` and ``llmos kernel start`` alike) whose parsers reject a bad
value with a message naming the flag, so argparse exits with code 2 before anything starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from dataclasses import dataclass, fields
from typing import Any

KV_POLICIES = ("static", "dynamic", "isolated")


@dataclass(frozen=True)
class KernelConfig:
    """Settings of one kernel. Sizes in bytes, times in seconds.

    Every value is checked against its flag's range when the config is built (ValueError naming
    the flag), so a config made in code is held to the same bounds as the command line.
    """

    max_batch: int | None = None  # most processes per model instance per step; None: sized by the KV pool
    kv_policy: str = "static"  # KV memory policy for models loaded on demand
    dtype: str = "auto"  # precision of models loaded without one (drivers/model/precision.py)
    prefix_cache: str = "on"  # "off": models loaded without the option do not share prefix KV blocks
    memory_limit: int | None = None  # host bytes for models; None: 3/4 of what is free at start
    zombie_ttl_s: float = 600.0  # a ZOMBIE nobody waited for is reaped this long after it finished
    max_zombies: int = 256  # most unreaped ZOMBIEs per owner; the oldest are reaped beyond it
    worker_silence_s: float = 60.0  # a ready worker silent this long (not even heartbeats) is dead
    client_buffer_bytes: int = 64 * 2**20  # most reply bytes the kernel holds for one client
    sched_policy: str = "priority"  # priority, fcfs or fair (kernel/scheduler.py)
    aging_s: float = 5.0  # seconds of waiting that raise a READY process one nice level
    quantum_tokens: int = 32  # tokens a process runs once admitted before it may be preempted on its nice value
    max_queue: int = 4096  # most READY processes over all models; beyond it spawn answers EBUSY
    max_procs_per_user: int | None = 1024  # live processes per user (EAGAIN beyond)
    max_kv_blocks_per_user: int | None = None  # KV blocks a user's processes may hold at once (None: no cap)
    max_tokens_per_minute: int | None = None  # prompt + output tokens per user per minute (EDQUOT beyond)
    user_quotas: str | None = None  # per-user overrides: "alice:procs=4,kv_blocks=800,tpm=20000;bob:tpm=0"
    journal: str = "on"  # "off": processes are not journaled (they do not survive a kernel crash)
    checkpoint_s: float = 0.25  # how often running processes' new tokens are committed to the journal
    max_capture_bytes: int = 64 * 2**20  # captured intermediates one process may store (kernel/capture.py)
    max_capture_bytes_per_user: int = 256 * 2**20  # a user's stored captures, in all
    listen: str | None = None  # more addresses to listen on, comma-separated (tcp ones with CURVE)
    insecure: bool = False  # tcp without CURVE (loopback only): every tcp caller is "anonymous"
    group: str | None = None  # the OS group whose members may reach the ipc socket
    delegate: str | None = None  # accounts that may act for other users: "gateway;svc=alice,bob" (kernel/delegation.py)
    metrics_port: int | None = None  # serve Prometheus metrics over HTTP on this port (0: any free one)
    metrics_host: str = "127.0.0.1"  # the interface the metrics port listens on
    ray: str | None = None  # run model instances on Ray too: "local" (start one here), "auto" or the head's HOST:PORT
    ray_placement_s: float = 60.0  # how long a Ray instance may wait to be placed before its load fails (ENOMEM)

    def __post_init__(self) -> None:
        for f in FLAGS:
            value = getattr(self, f.field)
            if value is None and f.field in NULLABLE:
                continue
            try:
                f.parse.check(value)
            except (argparse.ArgumentTypeError, TypeError) as exc:
                raise ValueError(f"{f.option}: {exc}") from None


NULLABLE = {"ray", "listen", "group", "delegate", "metrics_port", "memory_limit", "max_batch", "max_procs_per_user", "max_kv_blocks_per_user", "max_tokens_per_minute",
            "user_quotas"}
QUOTA_KEYS = {"procs": "max_procs", "kv_blocks": "max_kv_blocks", "tpm": "tokens_per_minute"}


def parse_quotas(text: str) -> dict[str, dict[str, int]]:
    """'alice:procs=4,kv_blocks=800,tpm=20000;bob:tpm=1000' -> {user: {limit: value}}; ValueError saying what
    is wrong."""
    out: dict[str, dict[str, int]] = {}
    for part in filter(None, (p.strip() for p in str(text).split(";"))):
        user, sep, limits = part.partition(":")
        if not sep or not user.strip():
            raise ValueError(f"{part!r}: expected USER:LIMIT=N[,LIMIT=N...]")
        got: dict[str, int] = {}
        for item in filter(None, (i.strip() for i in limits.split(","))):
            key, eq, value = item.partition("=")
            if not eq or key.strip() not in QUOTA_KEYS or not value.strip().isdigit():
                raise ValueError(f"{item!r}: expected one of {', '.join(QUOTA_KEYS)} = a whole number")
            got[QUOTA_KEYS[key.strip()]] = int(value)
        out[user.strip()] = got
    return out


def parse_size(text: str) -> int:
    """'8G', '512M', '1.5g', '100000' -> bytes; ValueError for anything else."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (examples: 8G, 512M, 1073741824)") from None
    if not value == value or value in (float("inf"), float("-inf")):  # NaN or infinite
        raise ValueError(f"{text!r} is not a size")
    return int(value)


class _Parser:
    """A flag's parser: ``parser(text)`` turns the command line's text into a value and checks it;
    ``parser.check(value)`` checks a value given in code. Both raise ArgumentTypeError saying why."""

    def __call__(self, text: str) -> Any:
        return self.check(self.convert(text))

    def convert(self, text: str) -> Any:
        raise NotImplementedError

    def check(self, value: Any) -> Any:
        raise NotImplementedError


class _IntIn(_Parser):
    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def convert(self, text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer in {self.lo}..{self.hi}, got {text!r}") from None

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not self.lo <= value <= self.hi:
            raise argparse.ArgumentTypeError(f"must be an integer in {self.lo}..{self.hi}, got {value!r}")
        return value


class _FloatIn(_Parser):
    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def convert(self, text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in [{self.lo:g}, {self.hi:g}], got {text!r}") \
                from None

    def check(self, value: Any) -> float:
        # the comparison also refuses NaN
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.lo <= value <= self.hi:
            raise argparse.ArgumentTypeError(f"must be a number in [{self.lo:g}, {self.hi:g}], got {value!r}")
        return float(value)


class _SizeIn(_Parser):
    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def convert(self, text: str) -> int:
        try:
            return parse_size(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not self.lo <= value <= self.hi:
            raise argparse.ArgumentTypeError(f"must be between {_size(self.lo)} and {_size(self.hi)}, "
                                             f"got {value!r}{' bytes' if isinstance(value, int) else ''}")
        return value


class _RayAddress(_Parser):
    """local, auto, or a Ray head's HOST:PORT (``ray start --head`` prints it). Not ray://: a Ray Client
    connection gives no per-node resources and other ownership rules (the kernel must run on a Ray node)."""

    def convert(self, text: str) -> str:
        return text

    def check(self, value: Any) -> str:
        import re

        if isinstance(value, str) and value.startswith("ray://"):
            raise argparse.ArgumentTypeError("ray:// (Ray Client) is not supported: run the kernel on a node of the "
                                             "cluster (ray start --address HEAD) and give --ray auto or HEAD:PORT")
        if not isinstance(value, str) or not (value in ("local", "auto") or re.fullmatch(
                r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):\d{1,5}", value)):
            raise argparse.ArgumentTypeError(f"must be local, auto or the Ray head's HOST:PORT, got {value!r}")
        return value


class _Choice(_Parser):
    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices

    def convert(self, text: str) -> str:
        return text

    def check(self, value: Any) -> str:
        if value not in self.choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(self.choices)}, got {value!r}")
        return value


class _Addresses(_Parser):
    def convert(self, text: str) -> str:
        return text

    def check(self, value: Any) -> str:
        from llmos.syscalls.address import check_address
        from llmos.syscalls.errors import InvalidArgument

        if not isinstance(value, str) or not value.strip():
            raise argparse.ArgumentTypeError("must be one or more addresses, comma-separated")
        for address in value.split(","):
            try:
                check_address(address.strip(), "--listen")
            except InvalidArgument as exc:
                raise argparse.ArgumentTypeError(exc.message) from None
        return value


class _Group(_Parser):
    def convert(self, text: str) -> str:
        return text

    def check(self, value: Any) -> str:
        import grp

        try:
            grp.getgrnam(value)
        except (KeyError, TypeError):
            raise argparse.ArgumentTypeError(f"no group {value!r} on this machine (make it with groupadd, "
                                             f"add the users who may call the kernel to it)") from None
        return value


class _Delegates(_Parser):
    def convert(self, text: str) -> str:
        return text

    def check(self, value: Any) -> str:
        from llmos.kernel.delegation import parse_delegates

        try:
            parse_delegates(value)
        except (ValueError, AttributeError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value


class _Host(_Parser):
    """A host name or IP address to listen on (no port, no scheme)."""

    def convert(self, text: str) -> str:
        return text

    def check(self, value: Any) -> str:
        import ipaddress
        import re

        if not isinstance(value, str) or not value:
            raise argparse.ArgumentTypeError("must be a host name or an IP address")
        try:
            ipaddress.ip_address(value)
            return value
        except ValueError:
            pass
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*",
                            value):
            raise argparse.ArgumentTypeError(f"must be a host name or an IP address, got {value!r}")
        return value


class _Switch(_Parser):
    """An on/off flag that takes no value (``--insecure``)."""

    def convert(self, text: str) -> bool:
        return bool(text)

    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"must be true or false, got {value!r}")
        return value


class _Quotas(_Parser):
    def convert(self, text: str) -> str:
        return text

    def check(self, value: Any) -> str:
        try:
            parse_quotas(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value


def _size(n: int) -> str:
    for unit, scale in (("T", 2**40), ("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def home_dir(text: str) -> Path:
    """--home: a directory path, absolute once parsed; an empty one is refused (it would mean the current
    directory to one party and $LLMOS_HOME to another)."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError("must be a directory path, got an empty string")
    return Path(text).expanduser().resolve()


@dataclass(frozen=True)
class Flag:
    field: str
    parse: _Parser
    metavar: str
    help: str
    name: str = ""  # the option's name when it is not the field's
    const: str | None = None  # the value of the flag given without one (``--ray``: local)

    @property
    def option(self) -> str:
        return "--" + (self.name or self.field.replace("_", "-"))


FLAGS: tuple[Flag, ...] = (
    Flag("max_batch", _IntIn(1, 4096), "N", "most processes per model instance per step (default: as many as the "
         "KV pool and the per-step token budget allow)"),
    Flag("kv_policy", _Choice(KV_POLICIES), "POLICY",
         "KV memory policy for models loaded on demand: static, dynamic or isolated (default static)"),
    Flag("dtype", _Choice(("auto", "float32", "bfloat16", "float16")), "DTYPE",
         "precision of models loaded without one (on demand, or llmos load without --dtype): auto (bfloat16 on "
         "CPUs with AMX or AVX512-BF16 and on GPUs that have it, else float32 on a CPU), float32, bfloat16, "
         "float16 (default auto)"),
    Flag("prefix_cache", _Choice(("on", "off")), "on|off",
         "whether models loaded without the option share the KV blocks of identical prompt prefixes between "
         "processes (default on)"),
    Flag("memory_limit", _SizeIn(2**20, 2**50), "SIZE",
         "host memory the kernel may give to models, e.g. 8G or 512M (default: 3/4 of what is free)"),
    Flag("zombie_ttl_s", _FloatIn(0.0, 365 * 86400.0), "SECONDS",
         "reap a finished process nobody waited for this long after it finished (default 600)",
         "zombie-ttl"),
    Flag("max_zombies", _IntIn(0, 1_000_000), "N",
         "most finished, unreaped processes per owner; the oldest are reaped beyond it (default 256)"),
    Flag("worker_silence_s", _FloatIn(0.5, 86400.0), "SECONDS",
         "a model worker that sends nothing for this long is counted dead (default 60)", "worker-timeout"),
    Flag("client_buffer_bytes", _SizeIn(2**20, 2**40), "SIZE",
         "most reply bytes the kernel holds for one client that does not read them (default 64M)",
         "client-buffer"),
    Flag("sched_policy", _Choice(("priority", "fcfs", "fair")), "POLICY",
         "scheduling policy: priority (nice values, aging, preemption; default), fcfs, or fair (users take turns)"),
    Flag("aging_s", _FloatIn(0.001, 86400.0), "SECONDS",
         "a waiting process gains one nice level per this many seconds, so low priorities progress (default 5)",
         "aging"),
    Flag("quantum_tokens", _IntIn(0, 1_000_000), "TOKENS",
         "tokens a process runs once admitted before aging may preempt it (default 32)", "quantum"),
    Flag("max_queue", _IntIn(1, 10_000_000), "N", "most processes waiting to run over all models; beyond it "
         "spawn answers EBUSY (default 4096)"),
    Flag("max_procs_per_user", _IntIn(1, 10_000_000), "N", "live processes per user; beyond it spawn answers "
         "EAGAIN (default 1024)"),
    Flag("max_kv_blocks_per_user", _IntIn(1, 2**40), "BLOCKS", "KV blocks one user's processes may hold at once; "
         "beyond it new ones wait, its idle sessions swap out and its worst running one is preempted, and one "
         "process that alone outgrows it ends with EDQUOT (default: no cap)"),
    Flag("max_tokens_per_minute", _IntIn(0, 2**40), "TOKENS", "prompt and output tokens per user per minute, "
         "checked when a spawn or a session's turn starts: beyond it they answer EDQUOT with when to retry; a "
         "request under way is not cut (default: no limit)"),
    Flag("journal", _Choice(("on", "off")), "on|off", "journal every process in the store, so that a kernel "
         "killed or stopped resumes them at its next start (default on; off only to measure what it costs)"),
    Flag("checkpoint_s", _FloatIn(0.01, 3600.0), "SECONDS", "how often the journal commits running processes' "
         "new tokens; a crash loses at most this much output, which the resume regenerates (default 0.25)",
         "checkpoint"),
    Flag("user_quotas", _Quotas(), "SPEC", "per-user limits overriding the defaults, e.g. "
         "'alice:procs=4,kv_blocks=800,tpm=20000;bob:tpm=1000'", "user-quota"),
    Flag("max_capture_bytes", _SizeIn(0, 2**44), "SIZE", "bytes of captured intermediates (spawn's capture) one "
         "process may store; at the cap its capture stops with a warning, its generation goes on; 0 turns "
         "captures off (default 64M)"),
    Flag("listen", _Addresses(), "ADDRESS[,ADDRESS]", "more addresses to serve besides --address, e.g. "
         "tcp://0.0.0.0:5556: tcp is encrypted and authenticated with CURVE (keys: llmos user add), or with "
         "--insecure plain, loopback only (default: none, only --address)"),
    Flag("insecure", _Switch(), "", "serve tcp addresses without CURVE (loopback addresses only; every tcp "
         "caller is then the one user 'anonymous'): for development, never across machines"),
    Flag("group", _Group(), "GROUP", "share the kernel with the members of this OS group: the ipc socket "
         "becomes 0660 and its directory 0750 with that group (the home 0710); the rest of the home stays "
         "owner-only (default: none, the owner only)"),
    Flag("delegate", _Delegates(), "NAME[=USER,USER][;NAME...]", "accounts that may act for other users, e.g. "
         "the account running the gateway (llmos serve): 'gateway' acts for any user but the admin, "
         "'svc=alice,bob' only for those; the admin always may (kernel/delegation.py) (default: none, the admin "
         "only)"),
    Flag("metrics_port", _IntIn(0, 65535), "PORT", "serve the Prometheus metrics (the prometheus syscall's "
         "text) on http://HOST:PORT/metrics; 0 picks a free port, said in the log (default: off)"),
    Flag("metrics_host", _Host(), "HOST", "the interface --metrics-port listens on; the metrics hold no "
         "process text or owner names (default 127.0.0.1; 0.0.0.0 for every interface)"),
    Flag("ray", _RayAddress(), "ADDRESS", "run model instances on Ray as well (model_load backend='ray'): without "
         "ADDRESS a Ray instance is started on this machine for the kernel's lifetime; 'auto' joins the cluster "
         "running here (ray start --head), HOST:PORT the head at that address; needs pip install 'llmos[ray]' "
         "(default: off, local worker processes only)", const="local"),
    Flag("ray_placement_s", _FloatIn(1.0, 86400.0), "SECONDS", "how long a Ray model instance may wait for Ray to "
         "place it (a node with its CPUs, GPUs and memory free) before its load fails with ENOMEM (default 60)",
         "ray-placement-timeout"),
    Flag("max_capture_bytes_per_user", _SizeIn(0, 2**48), "SIZE", "bytes of captured intermediates one user's "
         "processes may keep in the store, in all (stored, plus what captures under way may still write); "
         "beyond it a capture stops, or captures nothing, with a warning (default 256M)"),
)
assert {f.field for f in FLAGS} == {f.name for f in fields(KernelConfig)}, "every setting needs a flag"


def quotas_of(config: KernelConfig):
    """The config's per-user limits as ``kernel.quota.Quotas``."""
    from llmos.kernel.quota import Quotas, UserLimits

    default = UserLimits(config.max_procs_per_user, config.max_kv_blocks_per_user, config.max_tokens_per_minute)
    users = {}
    for user, limits in parse_quotas(config.user_quotas or "").items():
        users[user] = UserLimits(**{"max_procs": default.max_procs, "max_kv_blocks": default.max_kv_blocks,
                                    "tokens_per_minute": default.tokens_per_minute, **limits})
    return Quotas(default, users)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add every kernel flag to ``parser``; unset flags parse to None (the config's default applies)."""
    for f in FLAGS:
        if isinstance(f.parse, _Switch):
            parser.add_argument(f.option, dest=f.field, action="store_const", const=True, default=None, help=f.help)
        elif f.const is not None:
            parser.add_argument(f.option, dest=f.field, type=f.parse, nargs="?", const=f.const, default=None,
                                metavar=f.metavar, help=f.help)
        else:
            parser.add_argument(f.option, dest=f.field, type=f.parse, default=None, metavar=f.metavar, help=f.help)


def from_args(ns: argparse.Namespace) -> KernelConfig:
    """The config the parsed flags ask for; flags left unset keep the defaults."""
    return KernelConfig(**{f.field: getattr(ns, f.field) for f in FLAGS if getattr(ns, f.field, None) is not None})


def to_argv(ns: argparse.Namespace) -> list[str]:
    """The flags that were set, as an argv for the kernel process (``llmos kernel start`` forwards them)."""
    out: list[str] = []
    for f in FLAGS:
        value = getattr(ns, f.field, None)
        if value is True and isinstance(f.parse, _Switch):
            out.append(f.option)
        elif value is not None:
            out += [f.option, str(value)]
    return out
