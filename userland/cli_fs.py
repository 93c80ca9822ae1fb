"""``llmos fs ls|cat|put|get|rm|mv|stat`` and ``llmos dmesg``: the namespace and the kernel's log from the shell.

Human output by default, ``--json`` for programs. Errors are the kernel's, one line with the errno
(``llmos: [ENOENT] ...``), exit 1, as for every ``llmos`` command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from llmos._command import connect
from llmos.fs import FileStat
from llmos.progress import progress_bar
from llmos.syscalls.errors import InvalidArgument

LOG_FIELDS = ("seq", "ts", "level", "component", "event")  # a log line's fixed fields; the rest are shown as k=v


def _size(n: int) -> str:
    for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"


def format_ls(entries: list[FileStat]) -> str:
    """``ls -l`` for the namespace: kind, size (a directory: its entries), owner, mtime, name (dirs end in /)."""
    rows = [f"{'d' if e.kind == 'dir' else '-'} {_size(e.size) if e.kind == 'file' else str(e.size):>8} "
            f"{e.owner or '-':<12} {_when(e.mtime):<16} {e.name}{'/' if e.kind == 'dir' else ''}" for e in entries]
    return "\n".join(rows)


def format_stat(s: FileStat) -> str:
    lines = [f"   path: {s.path}", f"   kind: {s.kind}",
             f"   size: {s.size} {'bytes' if s.kind == 'file' else 'entries'}", f"  owner: {s.owner or '-'}",
             f"  mtime: {_when(s.mtime)}" + (f" ({s.mtime:.3f})" if s.mtime else "")]
    if s.kind == "file":
        lines.append(f"extents: {len(s.extents)}" + (f" ({', '.join(map(_size, s.extents[:8]))}"
                                                     f"{', ...' if len(s.extents) > 8 else ''})" if s.extents else ""))
    return "\n".join(lines)


def format_log_line(line: str) -> str:
    """One ring line for people: ``[time] level component: event k=v ...`` (a line that is not JSON as it is)."""
    try:
        rec = json.loads(line)
        ts = datetime.datetime.fromtimestamp(float(rec.get("ts", 0))).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    except (ValueError, TypeError, OverflowError, OSError):
        return line
    if not isinstance(rec, dict):
        return line
    rest = " ".join(f"{k}={v if isinstance(v, str) and ' ' not in v else json.dumps(v)}"
                    for k, v in rec.items() if k not in LOG_FIELDS)
    return f"[{ts}] {rec.get('level', ''):<7} {rec.get('component', '')}: {rec.get('event', '')}" + \
        (f" {rest}" if rest else "")


def _write_out(pieces: Iterable[bytes], out: Any) -> int:
    n = 0
    for piece in pieces:
        out.write(piece)
        n += len(piece)
    out.flush()
    return n


def cmd_ls(args: argparse.Namespace) -> int:
    with connect(args) as c:
        entries = c.fs.ls(args.path, args.limit)
    if args.json:
        print(json.dumps([e.__dict__ for e in entries]))
    elif entries:
        print(format_ls(entries))
    if entries.truncated:
        print(truncated_note(len(entries)), file=sys.stderr)
    return 0


def truncated_note(shown: int) -> str:
    """What ``ls`` says under a listing cut at ``shown`` entries."""
    return f"... more than {shown} entries: use --limit"


def cmd_stat(args: argparse.Namespace) -> int:
    with connect(args) as c:
        s = c.fs.stat(args.path)
    print(json.dumps(s.__dict__) if args.json else format_stat(s))
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    with connect(args) as c:
        if args.offset or args.length is not None:
            _write_out([c.fs.get(args.path, args.offset, args.length)], sys.stdout.buffer)
        else:
            with c.fs.open(args.path) as reader:
                _write_out(reader, sys.stdout.buffer)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    local = args.local if args.local is not None else os.path.basename(args.path.rstrip("/")) or "out"
    with connect(args) as c:
        total = c.fs.stat(args.path).size
        if local == "-":
            with c.fs.open(args.path) as reader:
                _write_out(reader, sys.stdout.buffer)
            return 0
        target = Path(local)
        if target.is_dir():
            target = target / (os.path.basename(args.path.rstrip("/")) or "out")
        part = target.with_name(target.name + ".part")  # a failed copy never leaves a half file under the name
        done = 0
        try:
            with progress_bar(f"get {args.path}") as bar, c.fs.open(args.path) as reader, open(part, "wb") as out:
                for piece in reader:
                    out.write(piece)
                    done += len(piece)
                    bar(done, total)
            os.replace(part, target)
        finally:
            if part.exists():
                part.unlink()
    if not args.json:
        print(f"{args.path} -> {target} ({done} bytes)")
    else:
        print(json.dumps({"path": args.path, "local": str(target), "bytes": done}))
    return 0


def cmd_put(args: argparse.Namespace) -> int:
    with connect(args) as c, progress_bar(f"put {args.path}") as bar:
        if args.local == "-":
            s = c.fs.put(args.path, sys.stdin.buffer, progress=bar)
        else:
            with open(args.local, "rb") as f:
                s = c.fs.put(args.path, f, progress=bar)
    print(json.dumps(s.__dict__) if args.json else f"{args.local} -> {s.path} ({s.size} bytes)")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with connect(args) as c:
        try:
            n = c.fs.rm(args.path, recursive=args.recursive)
        except InvalidArgument as exc:  # the kernel speaks of the syscall's argument; here it is a flag
            raise InvalidArgument(exc.message.replace("recursive=True", "-r"), exc.errno) from None
    print(json.dumps({"path": args.path, "removed": n}) if args.json
          else f"removed {args.path}" + (f" ({n} files)" if args.recursive else ""))
    return 0


def cmd_mv(args: argparse.Namespace) -> int:
    with connect(args) as c:
        n = c.fs.rename(args.src, args.dst, replace=args.replace)
    print(json.dumps({"src": args.src, "dst": args.dst, "moved": n}) if args.json
          else f"moved {args.src} to {args.dst} ({n} file{'s' if n != 1 else ''})")
    return 0


def cmd_dmesg(args: argparse.Namespace) -> int:
    with connect(args) as c:
        lines = c.dmesg(n=args.lines, follow=args.follow)
        try:
            for line in lines:
                print(line if args.json else format_log_line(line), flush=args.follow)
        finally:
            lines.close()
    return 0


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``fs`` (ls, cat, put, get, rm, stat) and ``dmesg`` to the ``llmos`` parser's subcommands."""
    from llmos._args import syscall_arg

    fs = sub.add_parser("fs", help="the namespace: ls, cat, put, get, rm, stat under /models, /data, /proc, "
                        "/home/<user>, /var/log", description="Files in the kernel's store. Paths are absolute: "
                        "/home/<you> is yours to write; /models, /data, /proc/<pid> and /var/log are readable "
                        "(writes to /models are the admin's, /data files their owner's).")
    fsub = fs.add_subparsers(dest="action", required=True)
    ls = fsub.add_parser("ls", parents=[common], help="list a directory (default /)")
    ls.add_argument("path", nargs="?", default="/", help="the directory to list (default /)")
    ls.add_argument("--json", action="store_true", help="one JSON list of stats")
    ls.add_argument("--limit", type=syscall_arg("fs_list", "limit"), default=1000,
                    help="most entries to list (default 1000)")
    ls.set_defaults(fn=cmd_ls)
    cat = fsub.add_parser("cat", parents=[common], help="write a file's bytes to stdout")
    cat.add_argument("path")
    cat.add_argument("--offset", type=syscall_arg("fs_get", "offset"), default=0, help="first byte (default 0)")
    cat.add_argument("--length", type=syscall_arg("fs_get", "length"), default=None,
                     help="bytes to read (default: to the end)")
    cat.set_defaults(fn=cmd_cat)
    put = fsub.add_parser("put", parents=[common], help="copy a local file (- for stdin) to PATH, replacing it "
                          "atomically; a progress bar on a terminal")
    put.add_argument("local", metavar="LOCAL")
    put.add_argument("path", metavar="PATH")
    put.add_argument("--json", action="store_true", help="print the new file's stat as JSON")
    put.set_defaults(fn=cmd_put)
    get = fsub.add_parser("get", parents=[common], help="copy PATH to a local file (default: its name here; - for "
                          "stdout)")
    get.add_argument("path", metavar="PATH")
    get.add_argument("local", metavar="LOCAL", nargs="?", default=None, help="the local file, or - for stdout "
                     "(default: the path's last name, here)")
    get.add_argument("--json", action="store_true")
    get.set_defaults(fn=cmd_get)
    rm = fsub.add_parser("rm", parents=[common], help="remove a file (-r: a directory and everything under it)")
    rm.add_argument("path")
    rm.add_argument("-r", "--recursive", action="store_true")
    rm.add_argument("--json", action="store_true")
    rm.set_defaults(fn=cmd_rm)
    mv = fsub.add_parser("mv", parents=[common], help="move a file or a directory and everything under it, in one "
                         "transaction (no data copied); DST taken: EEXIST unless --replace")
    mv.add_argument("src", metavar="SRC")
    mv.add_argument("dst", metavar="DST")
    mv.add_argument("--replace", action="store_true", help="remove what DST holds first (atomically, with the move)")
    mv.add_argument("--json", action="store_true")
    mv.set_defaults(fn=cmd_mv)
    st = fsub.add_parser("stat", parents=[common], help="a file's or directory's kind, size, owner, mtime, extents")
    st.add_argument("path")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_stat)

    dm = sub.add_parser("dmesg", aliases=["logs"], parents=[common], help="the kernel's log ring (/var/log/kernel): "
                        "the last lines, -f to follow (also: llmos logs)", description="Print the kernel's recent "
                        "log lines, oldest first (the ring keeps the last 10,000, across restarts).")
    dm.add_argument("-n", "--lines", type=syscall_arg("dmesg", "n"), default=100, metavar="N",
                    help="how many of the newest lines (default 100)")
    dm.add_argument("-f", "--follow", action="store_true", help="then print new lines as they are logged (Ctrl-C "
                    "ends it)")
    dm.add_argument("--json", action="store_true", help="the lines as the kernel logged them (one JSON per line)")
    dm.set_defaults(fn=cmd_dmesg)
