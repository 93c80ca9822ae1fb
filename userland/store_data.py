"""Data sets in the store (``/data/<name>``): streaming import of plain text, JSON lines and CSV, and ranged reads
of records (``client.data``, ``llmos data``).

Layout of a data set:

- ``/data/<name>/records``: the records, UTF-8, concatenated (no separator);
- ``/data/<name>/index``: n + 1 offsets into ``records``, uint64 little-endian (record i is bytes
  ``[index[i], index[i + 1])``);
- ``/data/<name>/meta.json``: {format, records, bytes, source, field, created (unix), skipped}; written last,
  so a data set without it is an import that did not finish.

An import reads its file a line at a time and sends frames of at most FRAME bytes as it goes (two uploads
at once: records and index), so its memory does not grow with the file: a file larger than RAM imports.
A read fetches the slice of the index it needs, then the byte range of those records, never whole files.
"""

from __future__ import annotations

import array
import codecs
import csv
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator

from llmos.syscalls.errors import Busy, InvalidArgument, LLMOSError, NotFound, NotPermitted, quote

if TYPE_CHECKING:
    from llmos.client import Client

DATA = "/data"
FORMATS = ("text", "jsonl", "csv")
FRAME = 4 * 2**20  # bytes per fs_put frame
INDEX_FRAME = 256 << 10  # the index goes out in small frames: its buffer never grows with the file
MAX_RECORD_BYTES = 64 * 2**20  # one line (or record) of the source at most; a longer one is refused
READ_BATCH = 1024  # records per ranged read when iterating
Progress = Callable[[int, "int | None"], None]  # (source bytes read, source size or None)


def check_name(name: Any) -> str:
    """``name`` if it can name a data set (as a model name: 1-128 letters, digits, ``_ . + -``)."""
    from llmos.drivers.model.from_store import NAME_DOC, NAME_MAX, NAME_RE

    if not isinstance(name, str) or not 0 < len(name) <= NAME_MAX or not NAME_RE.fullmatch(name):
        raise InvalidArgument(f"data set name {quote(name)} is not a store name: {NAME_DOC}")
    return name


def data_dir(name: str) -> str:
    return f"{DATA}/{name}"


META_KEYS = ("format", "records", "bytes", "source", "created")  # what ls and stat show; a meta.json lacks none


def staging(name: str) -> str:
    """A fresh hidden directory an import of ``name`` writes into before it is renamed over ``/data/<name>``."""
    return f"{DATA}/.import-{name}-{secrets.token_hex(4)}"


def is_staging_of(entry: str, name: str) -> bool:
    """True for the name of a staging directory an import of ``name`` made (a leftover of a killed one)."""
    return re.fullmatch(rf"\.import-{re.escape(name)}-[0-9a-f]{{8}}", entry) is not None


# -- reading a source file, one record at a time --------------------------------------------------------------
def _lines(fh: IO[bytes], source: str) -> Iterator[tuple[int, "str | Bad"]]:
    """(line number, text with its line end) of a binary file, decoded as UTF-8 (a BOM at its start dropped);
    a line that is not UTF-8 comes as a Bad (a bad row, skipped with skip_bad)."""
    n = 0
    while True:
        raw = fh.readline(MAX_RECORD_BYTES + 1)
        if not raw:
            return
        n += 1
        if len(raw) > MAX_RECORD_BYTES:
            raise InvalidArgument(f"{source}: line {n} is longer than {MAX_RECORD_BYTES} bytes")
        if n == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            yield n, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield n, Bad(n, f"not UTF-8 (byte {exc.start})")


class Bad(Exception):
    """A bad row: the line number and why (turned into InvalidArgument, or skipped with skip_bad)."""

    def __init__(self, line: int, why: str) -> None:
        super().__init__(why)
        self.line, self.why = line, why


def _text(lines: Iterator[tuple[int, "str | Bad"]], paragraphs: bool) -> Iterator[str | Bad]:
    para: list[str] = []
    for _, line in lines:
        if isinstance(line, Bad):
            yield line
            continue
        line = line.rstrip("\r\n")
        if not paragraphs:
            if line.strip():
                yield line
        elif line.strip():
            para.append(line)
        elif para:
            yield "\n".join(para)
            para = []
    if para:
        yield "\n".join(para)


def _jsonl(lines: Iterator[tuple[int, "str | Bad"]], field: str) -> Iterator[str | Bad]:
    for n, line in lines:
        if isinstance(line, Bad):
            yield line
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Bad(n, f"invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            yield Bad(n, f"a JSON {type(obj).__name__}, not an object")
        elif field not in obj:
            yield Bad(n, f"no field {quote(field)}")
        elif not isinstance(obj[field], str):
            yield Bad(n, f"field {quote(field)} is a {type(obj[field]).__name__}, not a string")
        elif obj[field]:
            yield obj[field]


def _csv(lines: Iterator[tuple[int, "str | Bad"]], field: str | None, source: str) -> Iterator[str | Bad]:
    undecodable: list[Bad] = []  # lines the csv reader never sees; reported after the row they preceded

    def text_lines() -> Iterator[str]:
        for _, line in lines:
            if isinstance(line, Bad):
                undecodable.append(line)
            else:
                yield line

    reader = csv.reader(text_lines(), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        header = None
    except csv.Error as exc:
        raise InvalidArgument(f"{source}: line 1: not CSV: {exc}") from None
    if undecodable and undecodable[0].line == 1:
        raise InvalidArgument(f"{source}: line 1 (the CSV header) is {undecodable[0].why}")
    if header is None:
        yield from undecodable
        return
    if field is not None:
        if field not in header:
            raise InvalidArgument(f"{source}: the CSV header has no column {quote(field)} (it has "
                                  f"{quote(', '.join(header))})")
        col = header.index(field)
    elif "text" in header:
        col = header.index("text")
    elif len(header) == 1:
        col = 0
    else:
        raise InvalidArgument(f"{source}: the CSV has {len(header)} columns and none is 'text': name one with "
                              f"--field (columns: {quote(', '.join(header))})")
    while True:
        try:
            row = next(reader)
        except StopIteration:
            yield from undecodable
            return
        except csv.Error as exc:
            row = Bad(reader.line_num, f"not CSV: {exc}")
        while undecodable:
            yield undecodable.pop(0)
        if isinstance(row, Bad):
            yield row
            continue
        if not row:
            continue
        if len(row) <= col:
            yield Bad(reader.line_num, f"{len(row)} columns, the header has {len(header)}")
        elif row[col]:
            yield row[col]


def read_records(fh: IO[bytes], fmt: str = "text", field: str | None = None, paragraphs: bool = False,
                 skip_bad: bool = False, source: str = "input", skipped: list[int] | None = None) -> Iterator[str]:
    """The records of binary file ``fh``, one at a time (the file is read a line at a time).

    text: one record per non-empty line (``paragraphs``: per run of non-blank lines); jsonl: the string at
    ``field`` (default "text") of each line's object, blank lines skipped; csv: the ``field`` column (default
    the "text" column, or the only one), the first row being the header. Empty values are skipped. A bad
    row (a line that is not UTF-8, invalid JSON, no such field, a short CSV row) raises InvalidArgument naming ``source`` and its line,
    or with ``skip_bad`` is skipped, its line number appended to ``skipped``."""
    if fmt not in FORMATS:
        raise InvalidArgument(f"format {quote(fmt)}: one of {', '.join(FORMATS)}")
    if paragraphs and fmt != "text":
        raise InvalidArgument("--paragraphs applies to the text format only")
    if field is not None and fmt == "text":
        raise InvalidArgument("a field applies to jsonl and csv only")
    lines = _lines(fh, source)
    items = (_text(lines, paragraphs) if fmt == "text" else _jsonl(lines, field or "text") if fmt == "jsonl"
             else _csv(lines, field, source))
    for item in items:
        if isinstance(item, Bad):
            if not skip_bad:
                raise InvalidArgument(f"{source}: line {item.line}: {item.why} (--skip-bad skips such rows)")
            if skipped is not None:
                skipped.append(item.line)
            continue
        yield item


# -- uploading as it goes ---------------------------------------------------------------------------------------
class _Upload:
    """A file written frame by frame as its bytes come (an upload, committed by ``close``)."""

    def __init__(self, client: "Client", path: str) -> None:
        self.client, self.path = client, path
        self.upload: int | None = None
        self.parts: list[bytes] = []
        self.held = 0
        self.size = 0

    def write(self, data: bytes) -> None:
        self.parts.append(data)
        self.held += len(data)
        while self.held >= FRAME:
            self._send(FRAME)

    def _send(self, n: int) -> None:
        joined = b"".join(self.parts)
        frame, rest = joined[:n], joined[n:]
        self.parts, self.held = ([rest] if rest else []), len(rest)
        self.upload = self.client.fs_put(self.path, frame, upload=self.upload, last=False)["upload"]
        self.size += len(frame)

    def close(self) -> dict[str, Any]:
        data = b"".join(self.parts)
        self.parts, self.held = [], 0
        self.size += len(data)
        return self.client.fs_put(self.path, data, upload=self.upload, last=True)


def _little_endian(offsets: array.array) -> bytes:
    if sys.byteorder != "little":
        offsets = array.array("Q", offsets)
        offsets.byteswap()
    return offsets.tobytes()


class DataSets:
    """The data sets in the store over one Client (``client.data``)."""

    def __init__(self, client: "Client") -> None:
        self.client = client

    def import_file(self, source: str | os.PathLike | IO[bytes], name: str, format: str = "text",
                    field: str | None = None, *, paragraphs: bool = False, skip_bad: bool = False,
                    replace: bool = False, progress: Progress | None = None) -> dict[str, Any]:
        """Import ``source`` (a path, or a binary file object read to its end) as data set ``name`` and return
        its meta ({name, format, field, records, bytes, source, created, skipped}). Records as
        :func:`read_records` says; streamed, in constant memory. The import is written into a hidden staging
        directory (``/data/.import-<name>-<random>``) and renamed over ``/data/<name>`` in one transaction once
        every file is committed, so readers see the old set or the new one; a failed or interrupted import
        removes its staging directory and leaves the old set as it was (one left by a kill -9 is removed by the
        next import of that name). ``replace``: an existing data set of that name is replaced (yours, or as
        the admin), else Busy (EBUSY). ``progress(read, size)`` in source bytes. Raises InvalidArgument (a bad
        row: its line number; every row bad; a bad name, format or field), NotPermitted, NoSpace."""
        name = check_name(name)
        if format not in FORMATS:
            raise InvalidArgument(f"format {quote(format)}: one of {', '.join(FORMATS)}")
        if self.client.fs.exists(data_dir(name)) and not replace:
            raise Busy(f"data set {quote(name)} exists: `llmos data rm {name}` first, or import with --replace")
        self._remove_leftovers(name)
        stage = staging(name)
        opened = not hasattr(source, "read")
        fh: IO[bytes] = open(source, "rb") if opened else source  # type: ignore[arg-type]
        label = Path(source).name if opened else str(getattr(source, "name", "<stream>"))
        try:
            try:
                total: int | None = os.fstat(fh.fileno()).st_size
            except (OSError, AttributeError, ValueError):
                total = None
            meta = self._import(fh, stage, name, format, field, paragraphs, skip_bad, label, total, progress)
            self.client.fs.rename(stage, data_dir(name), replace=replace)
            return meta
        except BaseException:
            try:
                self.client.fs.rm(stage, recursive=True)
            except LLMOSError:
                pass  # nothing was committed: the uploads are dropped by the kernel
            raise
        finally:
            if opened:
                fh.close()

    def _remove_leftovers(self, name: str) -> None:
        """Remove the staging directories of earlier imports of ``name`` that were killed before cleaning up."""
        try:
            entries = self.client.fs.ls(DATA, limit=10_000)
        except NotFound:
            return
        for e in entries:
            if e.kind == "dir" and is_staging_of(e.name, name):
                try:
                    self.client.fs.rm(e.path, recursive=True)
                except (NotFound, NotPermitted):
                    pass  # gone meanwhile, or someone else's: theirs to remove

    def _import(self, fh: IO[bytes], stage: str, name: str, fmt: str, field: str | None, paragraphs: bool,
                skip_bad: bool, label: str, total: int | None, progress: Progress | None) -> dict[str, Any]:
        records = _Upload(self.client, stage + "/records")
        index = _Upload(self.client, stage + "/index")
        offsets = array.array("Q", [0])
        at, n, skipped = 0, 0, []
        last_report = 0
        for text in read_records(fh, fmt, field, paragraphs, skip_bad, label, skipped):
            raw = text.encode("utf-8")
            records.write(raw)
            at += len(raw)
            n += 1
            offsets.append(at)
            if len(offsets) * 8 >= INDEX_FRAME:
                index.write(_little_endian(offsets))
                offsets = array.array("Q")
            if progress is not None and records.size != last_report:
                last_report = records.size
                progress(fh.tell(), total)
        if n == 0 and skipped:
            raise InvalidArgument(f"{label}: every row is bad ({len(skipped)} skipped, the first at line "
                                  f"{skipped[0]}): nothing was imported")
        index.write(_little_endian(offsets))
        records.close()
        index.close()
        meta = {"name": name, "format": fmt, "field": field if fmt != "text" else None, "paragraphs": paragraphs,
                "records": n, "bytes": at, "source": label, "created": time.time(), "skipped": len(skipped),
                "skipped_lines": skipped[:100]}
        self.client.fs.put(stage + "/meta.json", json.dumps(meta).encode())
        if progress is not None:
            progress(total if total is not None else fh.tell(), total)
        return meta

    def stat(self, name: str) -> dict[str, Any]:
        """The data set's meta (see ``import_file``) with its owner; NotFound when there is none (or its import
        did not finish); InvalidArgument (EINVAL) when its meta.json is unreadable (not a JSON object with
        format, records, bytes, source and created: written by hand with ``fs put``)."""
        name = check_name(name)
        try:
            st = self.client.fs.stat(data_dir(name) + "/meta.json")
            raw = self.client.fs.get(st.path)
        except NotFound:
            raise NotFound(f"no data set {quote(name)} in the store ({data_dir(name)}; `llmos data ls` lists "
                           "them)") from None
        try:
            meta = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"data set {quote(name)}: unreadable meta.json (not JSON: {exc}); remove it "
                                  f"with `llmos data rm {name}` or import it again") from None
        missing = [k for k in META_KEYS if k not in meta] if isinstance(meta, dict) else None
        if missing is None or missing:
            why = f"lacks {', '.join(missing)}" if missing else f"a JSON {type(meta).__name__}, not an object"
            raise InvalidArgument(f"data set {quote(name)}: unreadable meta.json ({why}); remove it with "
                                  f"`llmos data rm {name}` or import it again")
        return {**meta, "name": name, "owner": st.owner}

    def ls(self) -> list[dict[str, Any]]:
        """Every data set, by name: its meta and owner; one whose import did not finish has ``complete`` false,
        one whose meta.json is unreadable also ``error`` (why). Names starting with "." (an import's staging
        directory) and directories whose names no import makes are left out."""
        try:
            entries = self.client.fs.ls(DATA, limit=10_000)
        except NotFound:
            return []
        rows = []
        for e in entries:
            if e.kind != "dir" or e.name.startswith("."):
                continue
            try:
                check_name(e.name)
            except InvalidArgument:
                continue  # a directory no import makes
            try:
                rows.append({**self.stat(e.name), "complete": True})
            except NotFound:
                rows.append({"name": e.name, "complete": False})
            except InvalidArgument as exc:
                rows.append({"name": e.name, "complete": False, "error": exc.message})
        return rows

    def count(self, name: str) -> int:
        """Records in the data set (from its index's size)."""
        name = check_name(name)
        try:
            return self.client.fs.stat(data_dir(name) + "/index").size // 8 - 1
        except NotFound:
            raise NotFound(f"no data set {quote(name)} in the store ({data_dir(name)})") from None

    def records(self, name: str, start: int = 0, count: int | None = None) -> list[str]:
        """Records ``[start, start + count)`` (``count`` None: to the end; past the end: fewer), read with two
        ranged reads: that slice of the index, then those records' bytes. InvalidArgument for a negative
        start or count; NotFound."""
        for what, v in (("start", start), ("count", count)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise InvalidArgument(f"{what} must be a whole number >= 0, not {quote(v)}")
        n = self.count(name)
        stop = n if count is None else min(n, start + count)
        if start >= stop:
            return []
        idx = self.client.fs.get(data_dir(name) + "/index", 8 * start, 8 * (stop - start + 1))
        offsets = array.array("Q")
        offsets.frombytes(idx)
        if sys.byteorder != "little":
            offsets.byteswap()
        base = offsets[0]
        blob = self.client.fs.get(data_dir(name) + "/records", base, offsets[-1] - base)
        return [blob[offsets[i] - base:offsets[i + 1] - base].decode("utf-8") for i in range(len(offsets) - 1)]

    def iter(self, name: str, start: int = 0, count: int | None = None, batch: int = READ_BATCH) -> Iterator[str]:
        """The records ``[start, start + count)`` one by one, read ``batch`` at a time."""
        n = self.count(name)
        stop = n if count is None else min(n, start + count)
        for lo in range(start, stop, batch):
            yield from self.records(name, lo, min(batch, stop - lo))

    def rm(self, name: str) -> int:
        """Remove the data set (yours, or any as the admin); returns the files removed. NotFound, NotPermitted."""
        name = check_name(name)
        try:
            return self.client.fs.rm(data_dir(name), recursive=True)
        except NotFound:
            raise NotFound(f"no data set {quote(name)} in the store ({data_dir(name)})") from None

