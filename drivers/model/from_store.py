"""Models in the store (``/models/<name>``): what a model name means there, the check before loading, and the
zero-copy load from LMDB's memory map.

How a model lies in the store (``llmos model import`` puts it so, ``userland/store_models.py``): every
file of a Hugging Face model directory under ``/models/<name>/``. A ``*.safetensors`` file is its 8-byte
header length and JSON header as the first extent, then each tensor's bytes as an extent of its own
(bytes between tensors, if any, end the extent before them). An extent is one LMDB value, contiguous in
the map, so the worker makes each tensor with ``torch.frombuffer`` over the map itself: no read, no copy.
A tensor is copied only where that cannot hold: one stored over several extents (over 1 GiB, an
extent's limit; or a file written another way), one small enough to live inside an LMDB leaf page
(under ~2 KiB: not aligned), and one whose dtype is not the one the model runs in (float16 weights
for a float32 CPU model are converted, as ``from_pretrained`` does).

The worker's read transaction lasts only for the load. The mapped pages stay valid after it: LMDB never
moves a page, and it reuses one only once the value on it is deleted or replaced, which the kernel refuses
(EBUSY) for the files of a loaded model (kernel/files.py). So a long-lived model pins no old pages, and
the journal's frequent commits keep reusing the store's free pages (a reader held for the model's life
made the file grow by every page rewritten meanwhile).

In the kernel, a model name resolves through the store the kernel opened (:func:`use_store`): one
Store per process.
"""

from __future__ import annotations

import bisect
import contextlib
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from llmos.drivers.model.registry import check_tokenizer_files, parse_config, safetensors_header
from llmos.syscalls.errors import InvalidArgument, NotFound, quote

SCHEME = "store:"
MODELS = "/models"
NAME_MAX = 128
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
NAME_DOC = "1-128 letters, digits and _ . + - (not first: . + -)"
ALIGN = 16  # bytes: a tensor in the map at an address off this is copied (LMDB's leaf pages align values to 2)

_fs: Any = None  # this process's store (the kernel's FS), where model names resolve
_checked: dict[str, tuple] = {}  # model name -> the stamps of its files when it last passed the check


def use_store(fs: Any) -> None:
    """Resolve model names through ``fs`` (an ``llmos.drivers.storage.FS``) in this process; None: no store.
    The kernel calls this once its store is open."""
    global _fs
    _fs = fs
    _checked.clear()


def process_store() -> Any:
    """The FS given to :func:`use_store`, or None."""
    return _fs


def check_name(name: Any) -> str:
    """``name`` if it can name a model in the store, else InvalidArgument."""
    if not isinstance(name, str) or not 0 < len(name) <= NAME_MAX or not NAME_RE.fullmatch(name):
        raise InvalidArgument(f"model name {quote(name)} is not a store name: {NAME_DOC}")
    return name


def model_dir(name: str) -> str:
    """The store directory of model ``name``: ``/models/<name>``."""
    return f"{MODELS}/{name}"


def ref(name: str) -> str:
    """The resolved form of a store model, what the kernel keys it by and the worker is given:
    ``store:/models/<name>``."""
    return SCHEME + model_dir(name)


def ref_name(model: str) -> str | None:
    """The name in a resolved store reference (``store:/models/<name>``), else None."""
    prefix = SCHEME + MODELS + "/"
    if isinstance(model, str) and model.startswith(prefix):
        name = model[len(prefix):]
        return name if NAME_RE.fullmatch(name) and len(name) <= NAME_MAX else None
    return None


def store_name(model: str) -> str | None:
    """The store model a model string may name: ``<name>``, ``/models/<name>`` or ``store:/models/<name>``
    (a name being 1-128 of letters, digits, ``_ . + -``); None for anything else."""
    if not isinstance(model, str):
        return None
    for prefix in (SCHEME + MODELS + "/", MODELS + "/", ""):
        if model.startswith(prefix):
            name = model[len(prefix):]
            if 0 < len(name) <= NAME_MAX and NAME_RE.fullmatch(name):
                return name
            return None
    return None


# -- the check, from the store ------------------------------------------------------------------------------
def model_files(fs: Any, name: str) -> dict[str, Any]:
    """The files directly under ``/models/<name>`` (file name -> Stat); NotFound when there are none."""
    nothing = NotFound(f"nothing is at {model_dir(name)} (`llmos model ls` lists the store's models)")
    try:
        entries = fs.list(model_dir(name))
    except NotFound:
        raise nothing from None
    files = {s.path.rsplit("/", 1)[1]: s for s in entries if s.kind == "file"}
    if not files:
        raise nothing
    return files


def check_model(fs: Any, name: str) -> dict[str, Any]:
    """Check model ``name`` in the store as ``registry.check_model_dir`` checks a directory; returns its files.

    NotFound (ENOENT) when ``/models/<name>`` holds no config.json (nothing, or an import that did not
    finish: config.json is written last); InvalidArgument (EINVAL) naming the file and the fault for a
    broken config.json, no tokenizer's files, no safetensors weights or a malformed safetensors header.
    Only config.json and the headers are read, and not again while the files are unchanged."""
    files = model_files(fs, name)
    where = f"model {quote(name)} in the store"
    if "config.json" not in files:
        raise NotFound(f"{model_dir(name)} has no config.json (an import that did not finish? `llmos model rm "
                       f"{name}` and import it again)")
    stamp = tuple(sorted((n, s.size, s.mtime) for n, s in files.items()))
    if _checked.get(name) == stamp:
        return files
    parse_config(fs.read(files["config.json"].path), where)
    check_tokenizer_files(set(files), where)
    weights = sorted(n for n in files if n.endswith(".safetensors"))
    if not weights:
        raise InvalidArgument(f"{where}: no *.safetensors weights")
    for n in weights:
        path = files[n].path
        safetensors_header(lambda lo, hi, path=path: fs.read(path, lo, hi - lo), files[n].size, n, where)
    _checked[name] = stamp
    return files


def read_config(fs: Any, name: str) -> dict[str, Any]:
    """config.json of store model ``name`` as a dict (checked: see ``registry.check_config``)."""
    return parse_config(fs.read(model_dir(name) + "/config.json"), f"model {quote(name)} in the store")


def parameter_count(fs: Any, name: str) -> int:
    """Parameters of store model ``name``, counted from its safetensors headers (no tensor is read)."""
    total = 0
    for n, st in sorted(model_files(fs, name).items()):
        if n.endswith(".safetensors"):
            _, header = safetensors_header(lambda lo, hi, p=st.path: fs.read(p, lo, hi - lo), st.size, n)
            for key, meta in header.items():
                if key != "__metadata__":
                    numel = 1
                    for d in meta["shape"]:
                        numel *= d
                    total += numel
    return total


# -- loading, in the worker -----------------------------------------------------------------------------------
@dataclass
class LoadStats:
    """How a model's tensors were made: ``zero_copy`` of them (``zero_copy_bytes``) are views of the store's
    map; ``copied`` (``copied_bytes``) were copied (split over extents, unaligned, or converted)."""

    zero_copy: int = 0
    zero_copy_bytes: int = 0
    copied: int = 0
    copied_bytes: int = 0
    map_range: tuple[int, int] = (0, 0)  # addresses [lo, hi) of the store's map in this process, when known


@dataclass
class StoreHold:
    """What keeps a loaded store model's tensors valid: the store and its read transaction (closed by
    ``release``, after which the model's zero-copy tensors must not be touched)."""

    store: Any
    txn_cm: Any
    stats: LoadStats = field(default_factory=LoadStats)

    def release(self) -> None:
        if self.txn_cm is not None:
            self.txn_cm.__exit__(None, None, None)
            self.txn_cm = None
        self.store.close()


class _Extents:
    """A file as its extents (memoryviews into the map): byte ranges as views when one extent holds them."""

    def __init__(self, views: list[memoryview]) -> None:
        self.views = views
        self.starts: list[int] = []
        at = 0
        for v in views:
            self.starts.append(at)
            at += len(v)
        self.size = at

    def range(self, lo: int, hi: int) -> tuple[Any, bool]:
        """(bytes ``[lo, hi)``, zero-copy?): a view of one extent, else the pieces joined (a copy)."""
        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        base = self.starts[i] if self.starts else 0
        if self.views and hi <= base + len(self.views[i]):
            return self.views[i][lo - base:hi - base], True
        parts, j = [], i
        while j < len(self.views) and self.starts[j] < hi:
            b = self.starts[j]
            parts.append(self.views[j][max(lo - b, 0):min(hi - b, len(self.views[j]))])
            j += 1
        return b"".join(parts), False


def _torch_dtypes() -> dict[str, Any]:
    import torch

    out = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
    for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                       ("U32", "uint32"), ("U64", "uint64")):
        if hasattr(torch, attr):
            out[name] = getattr(torch, attr)
    return out


def tensors_from_extents(views: list[memoryview], filename: str, target: Any, stats: LoadStats,
                         where: str = "model") -> dict[str, Any]:
    """The tensors of one safetensors file stored as ``views`` (its extents, in order): views of the map where
    a tensor lies whole in one extent at an aligned address, copies otherwise (see the module's doc).
    Floating tensors of another dtype than ``target`` are converted. InvalidArgument for a bad header."""
    import torch

    ext = _Extents(views)
    n, header = safetensors_header(lambda lo, hi: bytes(ext.range(lo, hi)[0]), ext.size, filename, where)
    dtypes = _torch_dtypes()
    out: dict[str, Any] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        dt = dtypes.get(meta["dtype"])
        if dt is None:
            raise InvalidArgument(f"{where}: {quote(filename)}: tensor {quote(key)} has dtype {quote(meta['dtype'])}, "
                                  "which this torch cannot hold")
        begin, end = meta["data_offsets"]
        if end == begin:
            out[key] = torch.empty(meta["shape"], dtype=dt)
            continue
        buf, whole = ext.range(8 + n + begin, 8 + n + end)
        with warnings.catch_warnings():  # the map is read-only: nothing ever writes model weights
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(buf, dtype=dt)
        copied = not whole or t.data_ptr() % ALIGN != 0
        if whole and copied:
            t = t.clone()
        t = t.reshape(meta["shape"])
        if t.is_floating_point() and dt != target:
            t, copied = t.to(target), True
        if copied:
            stats.copied, stats.copied_bytes = stats.copied + 1, stats.copied_bytes + t.nbytes
        else:
            stats.zero_copy, stats.zero_copy_bytes = stats.zero_copy + 1, stats.zero_copy_bytes + t.nbytes
        out[key] = t
    return out


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no random init) and their
    buffers for real (RoPE frequencies and masks are computed in ``__init__`` and are not in the weights)."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module: Any, name: str, param: Any) -> None:
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _map_range(store: Any) -> tuple[int, int]:
    """The address range of the store's data.mdb mapping in this process (0, 0 when /proc does not say)."""
    target = str((Path(store.path) / "data.mdb").resolve())
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if line.rstrip().endswith(target):
                    lo, hi = line.split()[0].split("-")
                    return int(lo, 16), int(hi, 16)
    except OSError:
        pass
    return 0, 0


def load_model(model: str, device: str | None = None, dtype: str | None = None,
               home: Path | str | None = None) -> tuple[Any, Any, Any]:
    """(model, tokenizer, device) for a store reference ``store:/models/<name>``, as ``engine.load_model`` gives
    for a directory: in ``dtype`` (precision.py's ``resolve``), tied weights tied, generation_config.json honoured.

    The store is opened read-only at ``home``/store (default $LLMOS_HOME); the small files (config,
    tokenizer, chat template) go through a private temporary directory removed before returning; the
    weights are views of the map (see the module's doc). ``model._llmos_store`` (a StoreHold) keeps the read
    transaction open and says what was copied. NotFound, InvalidArgument (the model's files), StorageError."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from llmos.drivers.model.engine import check_tokenizer
    from llmos.drivers.model.precision import resolve
    from llmos.drivers.storage import FS, Store, store_dir
    from llmos.syscalls.address import llmos_home

    name = ref_name(model)
    if name is None:
        raise InvalidArgument(f"{quote(model)} is not a store model reference (store:/models/<name>)")
    where = f"model {quote(name)} in the store"
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    target = getattr(torch, resolve(dtype, dev.type))
    store = Store(store_dir(Path(home) if home is not None else llmos_home()), readonly=True).open()
    hold = StoreHold(store, None)
    tmp = Path(tempfile.mkdtemp(prefix="llmos-model-"))  # 0700: the files are the admin's model
    try:
        fs = FS(store)
        files = check_model(fs, name)
        hold.txn_cm = store.read()
        txn = hold.txn_cm.__enter__()
        state: dict[str, Any] = {}
        for n, st in sorted(files.items()):
            views = fs.extents(txn, st.path)
            if n.endswith(".safetensors"):
                state.update(tensors_from_extents(views, n, target, hold.stats, where))
            elif not n.endswith(".safetensors.index.json"):
                (tmp / n).write_bytes(b"".join(views))
        hold.stats.map_range = _map_range(store)
        tokenizer = AutoTokenizer.from_pretrained(str(tmp))
        config = AutoConfig.from_pretrained(str(tmp))
        check_tokenizer(tokenizer, int(getattr(config, "vocab_size", 0) or 0))
        with _parameters_on_meta():
            net = AutoModelForCausalLM.from_config(config, dtype=target)
        net.load_state_dict(state, strict=False, assign=True)
        net.tie_weights()
        lacking = [k for k, p in [*net.named_parameters(), *net.named_buffers()] if p.is_meta]
        if lacking:
            raise InvalidArgument(f"{where}: the weights lack {len(lacking)} tensors the config needs: "
                                  f"{quote(', '.join(lacking[:5]))}")
        if (tmp / "generation_config.json").exists():
            net.generation_config = GenerationConfig.from_pretrained(str(tmp))
        net.eval()
        if dev.type != "cpu":  # the device holds copies
            net = net.to(dev)
        # the views stay valid without the read: the kernel never frees a loaded model's pages (EBUSY)
        hold.txn_cm.__exit__(None, None, None)
        hold.txn_cm = None
        net._llmos_store = hold
        return net, tokenizer, dev
    except BaseException:
        hold.release()
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_engine(model: str, device: str | None = None, engine: str = "auto", **kw: Any) -> Any:
    """``engine.load_engine`` for a store model: the best engine for its architecture over :func:`load_model`."""
    from llmos.drivers.model.engine import load_engine as load_any

    return load_any(model, device, engine, loader=load_model, **kw)
