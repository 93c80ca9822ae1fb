"""Models in the store from a program: import a Hugging Face directory into ``/models/<name>``, export it back,
list and remove (``llmos model import|export|ls|rm``).

An import checks the directory first (``registry.check_model_dir``: config.json, the tokenizer's files,
every safetensors header; the shards an index names), so a broken model is refused before a byte is
sent. Each file then goes up as an upload (nothing of a file is visible before its last frame); a
``*.safetensors`` file goes with its header as the first extent and each tensor starting an extent of its
own, so the worker maps every tensor in place (``drivers/model/from_store.py``). config.json goes last:
a model without it is not one (the kernel says the import did not finish), and a failed import removes
what it wrote.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from llmos.drivers.model.from_store import MODELS, check_name, model_dir
from llmos.drivers.model.registry import DEFAULT_MODEL_DIR, check_model_dir, path_error
from llmos.syscalls.errors import Busy, InvalidArgument, LLMOSError, NotFound, NotPermitted, quote, quote_path

if TYPE_CHECKING:
    from llmos.client import Client

FRAME = 4 * 2**20  # bytes of file data per fs_put frame
MAX_EXTENT = 2**30  # the store's largest extent: a bigger tensor is split over several (copied once at load)
# weights in formats the store's loader does not read: left behind (the safetensors are what loads)
SKIP_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".ot", ".lock")
Progress = Callable[[int, int], None]  # (bytes done so far, total bytes)


@dataclass(frozen=True)
class Piece:
    """One frame of a file's upload: bytes ``[offset, offset + length)``; ``new_extent`` starts an extent there."""

    offset: int
    length: int
    new_extent: bool


def safetensors_pieces(size: int, header_len: int, header: dict[str, Any], frame: int = FRAME,
                       max_extent: int = MAX_EXTENT) -> list[Piece]:
    """The frames that upload a safetensors file of ``size`` bytes (``header_len``: its JSON header's length)
    so that the 8 bytes of length and the header are the first extent and every tensor (with bytes before
    the next one, if any) an extent of its own starting at its first byte; an extent over ``max_extent``
    bytes is split. Every frame is at most ``frame`` bytes; the frames cover the file in order."""
    data = 8 + header_len
    starts = {0}
    for key, meta in header.items():
        if key != "__metadata__":
            begin, end = meta["data_offsets"]
            if end > begin:
                starts.add(data + begin)
    bounds = sorted(s for s in starts if s < size) + [size]
    pieces = []
    for lo, hi in zip(bounds, bounds[1:]):
        for ext in range(lo, hi, max_extent):
            ext_end = min(ext + max_extent, hi)
            pieces += [Piece(off, min(frame, ext_end - off), off == ext) for off in range(ext, ext_end, frame)]
    return pieces


def plain_pieces(size: int, frame: int = FRAME) -> list[Piece]:
    """The frames of a file with no layout of its own (the store cuts it in 1 MiB extents)."""
    return [Piece(off, min(frame, size - off), False) for off in range(0, size, frame)]


def model_files(path: Path) -> list[Path]:
    """The files of a model directory that go to the store: every regular file at its top level, except
    hidden ones and weights in formats other than safetensors; config.json last."""
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
             and not p.name.endswith(SKIP_SUFFIXES)]
    return sorted(files, key=lambda p: (p.name == "config.json", p.name))


def check_importable(path: Path) -> list[Path]:
    """The files to import from ``path``, after the checks a load would make; InvalidArgument (or NotFound)
    naming the fault: not a model directory, a broken config/tokenizer/safetensors header, no safetensors
    weights, or an index naming a shard that is not there."""
    try:
        if not (path / "config.json").is_file():
            raise NotFound(f"no model at {quote_path(str(path))}: expected a Hugging Face model directory with "
                           "config.json")
        path = path.resolve()
    except OSError as exc:
        raise path_error(f"model {quote_path(str(path))}", exc) from None
    check_model_dir(path)
    files = model_files(path)
    names = {p.name for p in files}
    where = f"model {quote_path(str(path))}"
    if not any(n.endswith(".safetensors") for n in names):
        raise InvalidArgument(f"{where}: no *.safetensors weights (the store loads safetensors only; convert "
                              "pytorch_model.bin with transformers' save_pretrained(safe_serialization=True))")
    for index in (n for n in names if n.endswith(".safetensors.index.json")):
        try:
            shards = set(json.loads((path / index).read_bytes()).get("weight_map", {}).values())
        except (ValueError, AttributeError) as exc:
            raise InvalidArgument(f"{where}: {quote(index)} is not a safetensors index: {exc}") from None
        missing = sorted(shards - names)
        if missing:
            raise InvalidArgument(f"{where}: {quote(index)} names shards that are not there: "
                                  f"{quote(', '.join(missing[:5]))}")
    return files


def pieces_for(f: Path) -> list[Piece]:
    """How file ``f`` is uploaded: a safetensors file tensor by tensor, anything else plainly."""
    size = f.stat().st_size
    if not f.name.endswith(".safetensors"):
        return plain_pieces(size)
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return safetensors_pieces(size, n, header)


def upload_file(client: "Client", f: Path, store_path: str, pieces: list[Piece],
                progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Upload local file ``f`` to ``store_path`` frame by frame (``pieces``), committing at the end; returns the
    file's stat (a map). ``progress(n)`` after each frame with its bytes. Raises as ``fs_put``."""
    if not pieces:
        return client.fs_put(store_path, b"", last=True)
    upload = None
    with open(f, "rb") as fh:
        for p in pieces:
            fh.seek(p.offset)
            data = fh.read(p.length)
            if len(data) != p.length:
                raise InvalidArgument(f"{quote_path(str(f))} changed while being imported")
            upload = client.fs_put(store_path, data, upload=upload, new_extent=p.new_extent, last=False)["upload"]
            if progress is not None:
                progress(len(data))
    return client.fs_put(store_path, b"", upload=upload, last=True)


def exists(client: "Client", name: str) -> bool:
    """True when anything is stored under ``/models/<name>``."""
    return client.fs.exists(model_dir(name))


def import_model(client: "Client", path: str | os.PathLike, name: str | None = None, *, replace: bool = False,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Copy the Hugging Face model directory ``path`` into ``/models/<name>`` (default: the directory's name)
    and return its summary (as :func:`list_models` rows). The admin's only: the kernel refuses others EPERM.

    The files go into a hidden staging directory (``/models/.import-<name>-<random>``), renamed over
    ``/models/<name>`` in one transaction once every file is committed: a failed or interrupted import removes
    the staging directory and leaves the old model as it was (one left by a kill -9 is removed by the next
    import of that name). ``replace``: an existing model of that name is replaced (else Busy, EBUSY; EBUSY
    too while it is loaded: unload it first). ``progress(done, total)`` in bytes after every frame. Raises
    InvalidArgument/NotFound (the directory, before anything is sent), NotPermitted, NoSpace, and what a
    failed upload raises."""
    path = Path(path).expanduser()
    name = check_name(name if name is not None else path.resolve().name)
    files = check_importable(path)
    plan = [(f, f"{model_dir(name)}/{f.name}", pieces_for(f)) for f in files]
    total = sum(f.stat().st_size for f in files)
    if exists(client, name) and not replace:
        raise Busy(f"model {quote(name)} is already in the store: `llmos model rm {name}` first, or import "
                   "with --replace")
    _remove_leftovers(client, name)
    stage = f"{MODELS}/.import-{name}-{secrets.token_hex(4)}"
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    try:
        for f, store_path, pieces in plan:
            upload_file(client, f, stage + store_path[len(model_dir(name)):], pieces, step)
        client.fs.rename(stage, model_dir(name), replace=replace)
    except BaseException:
        try:
            client.fs.rm(stage, recursive=True)
        except LLMOSError:
            pass  # nothing was committed, or the kernel is gone: the error in hand says more
        raise
    if progress is not None and total == 0:
        progress(0, 0)
    return describe(client, name)


def _remove_leftovers(client: "Client", name: str) -> None:
    """Remove the staging directories of earlier imports of ``name`` that were killed before cleaning up."""
    try:
        entries = client.fs.ls(MODELS, limit=10_000)
    except NotFound:
        return
    for e in entries:
        if e.kind == "dir" and re.fullmatch(rf"\.import-{re.escape(name)}-[0-9a-f]{{8}}", e.name):
            try:
                client.fs.rm(e.path, recursive=True)
            except (NotFound, NotPermitted):
                pass  # gone meanwhile


def import_default(client: "Client", name: str = "default", *, replace: bool = False,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Import the model shipped with LLMOS as ``/models/<name>`` (default: ``/models/default``; the model name
    'default' itself stays the shipped directory), as :func:`import_model`."""
    return import_model(client, DEFAULT_MODEL_DIR, name, replace=replace, progress=progress)


def stored_files(client: "Client", name: str) -> list[Any]:
    """The files of store model ``name`` (FileStat), sorted; NotFound naming it when there is none."""
    check_name(name)
    try:
        files = [e for e in client.fs.ls(model_dir(name), limit=10_000) if e.kind == "file"]
    except NotFound:
        files = []
    if not files:
        raise NotFound(f"no model {quote(name)} in the store ({model_dir(name)}; `llmos model ls` lists them)")
    return files


def describe(client: "Client", name: str) -> dict[str, Any]:
    """One model's row: {name, path, size (bytes), files, owner, mtime (unix, newest file), complete (config.json
    is there: an import finished)}."""
    files = stored_files(client, name)
    names = {f.name for f in files}
    owner = next((f.owner for f in files if f.name == "config.json"), files[0].owner)
    return {"name": name, "path": model_dir(name), "size": sum(f.size for f in files), "files": len(files),
            "owner": owner, "mtime": max(f.mtime for f in files), "complete": "config.json" in names}


def list_models(client: "Client") -> list[dict[str, Any]]:
    """Every model in the store, by name, as :func:`describe` rows (names starting with "." are an import's
    staging directories: left out)."""
    try:
        entries = client.fs.ls(MODELS, limit=10_000)
    except NotFound:
        return []
    rows = []
    for e in entries:
        if e.kind == "dir" and not e.name.startswith("."):
            try:
                rows.append(describe(client, e.name))
            except (NotFound, InvalidArgument):
                continue  # removed meanwhile, or a directory no import makes
    return rows


def remove_model(client: "Client", name: str) -> int:
    """Remove store model ``name``; returns the files removed. NotFound, NotPermitted (not the admin), Busy
    (EBUSY: it is loaded, its workers read its weights in place: unload it first)."""
    check_name(name)
    try:
        return client.fs.rm(model_dir(name), recursive=True)
    except NotFound:
        raise NotFound(f"no model {quote(name)} in the store ({model_dir(name)}; `llmos model ls` lists them)") \
            from None


def export_model(client: "Client", name: str, dest: str | os.PathLike, *, overwrite: bool = False,
                 progress: Progress | None = None) -> list[Path]:
    """Write every file of store model ``name`` into directory ``dest`` (created if missing), byte for byte as
    imported; returns the paths written. A file already there is refused (InvalidArgument) unless
    ``overwrite``. Each file is written to a temporary name and renamed, so none is ever half there."""
    files = stored_files(client, name)
    out = Path(dest).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    targets = [out / f.name for f in files]
    clash = [t.name for t in targets if t.exists()]
    if clash and not overwrite:
        raise InvalidArgument(f"{quote_path(str(out))} already holds {quote(', '.join(clash[:5]))}: export into "
                              "an empty directory, or with --force to overwrite")
    total, done = sum(f.size for f in files), 0
    for f, target in zip(files, targets):
        part = target.with_name(f".{target.name}.llmos-part")
        try:
            with open(part, "wb") as fh, client.fs.open(f.path) as reader:
                for piece in reader:
                    fh.write(piece)
                    done += len(piece)
                    if progress is not None:
                        progress(done, total)
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)
    return targets
