"""Other processes for the fault tests, run as ``python -m tests.drivers.storage.procs ROLE STORE_DIR``.

reader: reads every file under /data over and over, checking each against ``pattern``, until the file
        STORE_DIR/../stop exists; prints "ready" after its first pass, then one JSON summary line.
hold:   opens the store, begins a read transaction, prints "holding", and waits to be killed.
keep:   opens the store read-only (as a model worker would), prints "open", exits when stdin closes.
grow:   writes 16 MiB through a Writer (a 1 MiB map grows), prints "written".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llmos.drivers.storage import FS, Store
from llmos.syscalls.errors import LLMOSError


def pattern(name: str, size: int) -> bytes:
    """The content the tests write at /data/<name>: the name repeated, cut to ``size`` bytes."""
    unit = (name + ":").encode()
    return (unit * (size // len(unit) + 1))[:size]


def reader(path: Path) -> None:
    stop = path.parent / "stop"
    summary = {"reads": 0, "files_seen": 0, "map_adoptions": 0, "errors": []}
    with Store(path, readonly=True, map_size=1 << 20) as store:  # small: the writer's growth must be adopted
        fs, size, ready = FS(store), store.map_size, False
        while True:
            stopping = stop.exists()  # one more pass after the stop file: it sees everything committed
            try:
                files = list(fs.walk("/data"))
                for st in files:
                    if fs.read(st.path) != pattern(st.path.rsplit("/", 1)[1], st.size):
                        summary["errors"].append(f"{st.path}: content differs")
                    summary["reads"] += 1
                summary["files_seen"] = max(summary["files_seen"], len(files))
            except LLMOSError as exc:
                summary["errors"].append(repr(exc))
            except Exception as exc:  # anything else escaping the package is a failure too
                summary["errors"].append(f"not an LLMOSError: {exc!r}")
            if store.map_size != size:
                summary["map_adoptions"] += 1
                size = store.map_size
            if not ready:
                print("ready", flush=True)
                ready = True
            if stopping:
                break
    print(json.dumps(summary), flush=True)


def hold(path: Path) -> None:
    store = Store(path).open()
    with store.read() as txn:
        txn.get(b"/data/x", db=store.db("meta"))
        print("holding", flush=True)
        sys.stdin.read()  # killed here


def keep(path: Path) -> None:
    with Store(path, readonly=True):
        print("open", flush=True)
        sys.stdin.read()


def grow(path: Path) -> None:
    from llmos.drivers.storage import Writer, ops

    with Store(path, map_size=1 << 20) as store:
        writer = Writer(store).start()
        for f in [writer.submit(ops.Put(f"/data/g{i}", pattern(f"g{i}", 1 << 20), "t")) for i in range(16)]:
            f.result(60)
        writer.stop()
    print("written", flush=True)


if __name__ == "__main__":
    {"reader": reader, "hold": hold, "keep": keep, "grow": grow}[sys.argv[1]](Path(sys.argv[2]))
