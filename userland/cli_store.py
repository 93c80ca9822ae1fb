"""``llmos model import|export|ls|rm``, ``llmos data import|ls|stat|cat|rm`` and ``llmos eval``: models and data sets
in the store, and perplexity, from the shell.

Human output by default (a progress bar on stderr when it is a terminal), ``--json`` for programs. Errors
are the kernel's (or the check's), one line with the errno, exit 1, as for every ``llmos`` command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

from llmos import evaluate as ev
from llmos import store_models as sm
from llmos._args import int_in
from llmos._command import connect
from llmos.progress import progress_bar


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"


# -- models -------------------------------------------------------------------------------------------------
def format_models(rows: list[dict[str, Any]]) -> str:
    """The ``llmos model ls`` table: name, size, files, owner, mtime (an unfinished import is marked)."""
    lines = [f"{'NAME':<32} {'SIZE':>10} {'FILES':>5} {'OWNER':<12} MODIFIED"]
    for r in rows:
        mark = "" if r["complete"] else "  (incomplete import)"
        lines.append(f"{r['name'][:32]:<32} {_size(r['size']):>10} {r['files']:>5} {r['owner'][:12]:<12} "
                     f"{_when(r['mtime'])}{mark}")
    return "\n".join(lines)


def cmd_model_import(args: argparse.Namespace) -> int:
    if args.default == (args.dir is not None):
        print("llmos model import: give a model directory, or --default for the shipped model", file=sys.stderr)
        return 2
    with connect(args) as c, progress_bar(f"import {args.name or args.dir or 'default'}") as update:
        if args.default:
            row = sm.import_default(c, args.name or "default", replace=args.replace, progress=update)
        else:
            row = sm.import_model(c, args.dir, args.name, replace=args.replace, progress=update)
    if args.json:
        print(json.dumps(row))
    else:
        # 'default' alone names the shipped directory: its store copy is run by its path
        how = row["path"] if row["name"] == "default" else row["name"]
        print(f"imported {row['name']}: {row['files']} files, {_size(row['size'])} at {row['path']} "
              f"(run it: llmos run --model {how} ...)")
    return 0


def cmd_model_export(args: argparse.Namespace) -> int:
    with connect(args) as c, progress_bar(f"export {args.name}") as update:
        paths = sm.export_model(c, args.name, args.dir, overwrite=args.force, progress=update)
    print(json.dumps({"name": args.name, "dir": str(args.dir), "files": [str(p) for p in paths]}) if args.json
          else f"exported {args.name}: {len(paths)} files to {args.dir}")
    return 0


def cmd_model_ls(args: argparse.Namespace) -> int:
    with connect(args) as c:
        rows = sm.list_models(c)
    print(json.dumps(rows) if args.json else format_models(rows))
    return 0


def cmd_model_rm(args: argparse.Namespace) -> int:
    with connect(args) as c:
        n = sm.remove_model(c, args.name)
    print(json.dumps({"name": args.name, "removed": n}) if args.json else f"removed {args.name} ({n} files)")
    return 0


# -- data sets ----------------------------------------------------------------------------------------------
def format_data(rows: list[dict[str, Any]]) -> str:
    """The ``llmos data ls`` table: name, format, records, bytes, owner, created, source."""
    lines = [f"{'NAME':<32} {'FORMAT':<6} {'RECORDS':>10} {'SIZE':>10} {'OWNER':<12} {'CREATED':<16} SOURCE"]
    for r in rows:
        if not r.get("complete", True):
            lines.append(f"{r['name'][:32]:<32} ({'unreadable meta.json' if r.get('error') else 'incomplete import'})")
            continue
        lines.append(f"{r['name'][:32]:<32} {r['format']:<6} {r['records']:>10} {_size(r['bytes']):>10} "
                     f"{r.get('owner', '')[:12]:<12} {_when(r['created']):<16} {r['source']}")
    return "\n".join(lines)


def cmd_data_import(args: argparse.Namespace) -> int:
    with connect(args) as c, progress_bar(f"import {args.name}") as update:
        meta = c.data.import_file(args.file, args.name, args.format, args.field, paragraphs=args.paragraphs,
                                  skip_bad=args.skip_bad, replace=args.replace, progress=update)
    if args.json:
        print(json.dumps(meta))
    else:
        skipped = f", {meta['skipped']} bad rows skipped" if meta["skipped"] else ""
        print(f"imported {meta['name']}: {meta['records']} records, {_size(meta['bytes'])} from {meta['source']}"
              f"{skipped}")
    return 0


def cmd_data_ls(args: argparse.Namespace) -> int:
    with connect(args) as c:
        rows = c.data.ls()
    print(json.dumps(rows) if args.json else format_data(rows))
    return 0


def cmd_data_stat(args: argparse.Namespace) -> int:
    with connect(args) as c:
        meta = c.data.stat(args.name)
    if args.json:
        print(json.dumps(meta))
    else:
        for k in ("name", "format", "field", "records", "bytes", "source", "owner", "created", "skipped"):
            v = meta.get(k)
            print(f"{k:>8}: {_when(v) if k == 'created' else '-' if v is None else v}")
    return 0


def cmd_data_cat(args: argparse.Namespace) -> int:
    with connect(args) as c:
        for i, text in enumerate(c.data.iter(args.name, args.start, args.count), args.start):
            sys.stdout.write(json.dumps({"i": i, "text": text}) + "\n" if args.json else text + "\n")
    return 0


def cmd_data_rm(args: argparse.Namespace) -> int:
    with connect(args) as c:
        n = c.data.rm(args.name)
    print(json.dumps({"name": args.name, "removed": n}) if args.json else f"removed {args.name} ({n} files)")
    return 0


# -- evaluation ---------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    with connect(args) as c, progress_bar(f"eval {args.model} on {args.data}", unit="records") as update:
        report = ev.evaluate(c, args.model, args.data, args.limit, progress=update)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"perplexity {report['perplexity']:.4f} of {report['model']} on {report['data']}: "
              f"{report['records']} records, {report['scored']} tokens scored, {report['nll_per_token']:.4f} nats "
              f"per token, {report['seconds']:.2f} s ({report['tokens_per_s']:.0f} tokens/s)")
        print(f"report: {report['path']}")
    return 0


_count, _positive = int_in(0), int_in(1)


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``model``, ``data`` and ``eval`` on the ``llmos`` parser's subcommands."""
    md = sub.add_parser("model", help="models in the store (/models): import, export, ls, rm")
    msub = md.add_subparsers(dest="action", required=True)
    mi = msub.add_parser("import", parents=[common], help="copy a Hugging Face model directory into the store "
                         "(the admin only)", description="Check DIR as a load would (config, tokenizer, every "
                         "safetensors header), then copy its files to /models/NAME, each tensor in an extent of "
                         "its own (loaded zero-copy from the store's map). Run it by name afterwards: llmos run "
                         "--model NAME.")
    mi.add_argument("dir", nargs="?", default=None, help="the model directory (config.json, tokenizer, *.safetensors; "
                    "default: none, give it or --default)")
    mi.add_argument("--name", default=None, help="the name in the store (default: the directory's name)")
    mi.add_argument("--default", action="store_true", help="import the model shipped with LLMOS as 'default' "
                    "(then reachable as /models/default; 'default' itself stays the shipped directory)")
    mi.add_argument("--replace", action="store_true", help="replace a model of that name")
    mi.add_argument("--json", action="store_true")
    mi.set_defaults(fn=cmd_model_import)
    me = msub.add_parser("export", parents=[common], help="write a stored model's files back into a directory")
    me.add_argument("name")
    me.add_argument("dir", help="target directory (created if missing)")
    me.add_argument("--force", action="store_true", help="overwrite files already there (default: EEXIST)")
    me.add_argument("--json", action="store_true", help="print {name, dir, files}")
    me.set_defaults(fn=cmd_model_export)
    ml = msub.add_parser("ls", parents=[common], help="list the models in the store")
    ml.add_argument("--json", action="store_true")
    ml.set_defaults(fn=cmd_model_ls)
    mr = msub.add_parser("rm", parents=[common], help="remove a model from the store (the admin only)")
    mr.add_argument("name")
    mr.add_argument("--json", action="store_true", help="print {name, removed}: removed is the files removed")
    mr.set_defaults(fn=cmd_model_rm)

    dt = sub.add_parser("data", help="data sets in the store (/data): import, ls, stat, cat, rm")
    dsub = dt.add_subparsers(dest="action", required=True)
    di = dsub.add_parser("import", parents=[common], help="import a text, JSON lines or CSV file as a data set "
                         "(streamed: any size)", description="Text: one record per non-empty line (--paragraphs: "
                         "per blank-line-separated paragraph). jsonl: each line's 'text' field (or --field). csv: "
                         "the 'text' column (or --field, or the only column); the first row is the header.")
    di.add_argument("file")
    di.add_argument("--name", required=True, help="the data set's name (/data/NAME)")
    di.add_argument("--format", choices=("text", "jsonl", "csv"), default="text")
    di.add_argument("--field", default=None, help="the JSON field or CSV column holding the text (default: "
                    "'text', or a CSV's only column)")
    di.add_argument("--paragraphs", action="store_true", help="text: a record per paragraph, not per line")
    di.add_argument("--skip-bad", action="store_true", help="skip bad rows (invalid JSON, a missing field) "
                    "instead of stopping at the first")
    di.add_argument("--replace", action="store_true", help="replace a data set of that name")
    di.add_argument("--json", action="store_true")
    di.set_defaults(fn=cmd_data_import)
    dl = dsub.add_parser("ls", parents=[common], help="list the data sets")
    dl.add_argument("--json", action="store_true")
    dl.set_defaults(fn=cmd_data_ls)
    ds = dsub.add_parser("stat", parents=[common], help="a data set's format, records, size, source, owner")
    ds.add_argument("name")
    ds.add_argument("--json", action="store_true")
    ds.set_defaults(fn=cmd_data_stat)
    dc = dsub.add_parser("cat", parents=[common], help="print a slice of a data set's records, one per line")
    dc.add_argument("name")
    dc.add_argument("--start", type=_count, default=0, help="first record, counted from 0 (default 0)")
    dc.add_argument("--count", type=_count, default=None, help="records to print (default: to the end)")
    dc.add_argument("--json", action="store_true", help="one JSON object per record: {i, text} (records may hold "
                    "newlines)")
    dc.set_defaults(fn=cmd_data_cat)
    dr = dsub.add_parser("rm", parents=[common], help="remove a data set (yours; any, as the admin)")
    dr.add_argument("name")
    dr.add_argument("--json", action="store_true", help="print {name, removed}: removed is the files removed")
    dr.set_defaults(fn=cmd_data_rm)

    e = sub.add_parser("eval", parents=[common], help="perplexity of a model over a stored data set",
                       description="Score every record of the data set with MODEL (a directory, 'default' or a "
                       "store name) and print the perplexity; the report is stored under "
                       "/home/<you>/eval/.")
    e.add_argument("model")
    e.add_argument("--data", required=True, help="the data set's name")
    e.add_argument("--limit", type=_positive, default=None, help="score only the first K records (default: all)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)
