"""FS: stat, ranged reads across extents, listings that collapse subtrees, walk, zero-copy extents."""

import numpy as np
import pytest

from llmos.drivers.storage import CHUNK, ops
from llmos.syscalls.errors import InvalidArgument, NotFound


def put_many(store, files):
    """Write ``{path: data}`` in one transaction (no Writer needed)."""
    def fn(txn):
        for path, data in files.items():
            ops.apply(ops.Put(path, data, "alice"), txn, store)
    store.write_txn(fn)


def test_read_takes_any_byte_range_across_extent_boundaries(store, fs):
    data = bytes(range(256)) * (CHUNK * 3 // 256 + 17)
    put_many(store, {"/data/big": data})
    assert fs.stat("/data/big").extents == [CHUNK, CHUNK, CHUNK, len(data) - 3 * CHUNK]
    assert fs.read("/data/big") == data
    for offset, length in [(0, 10), (CHUNK - 5, 10), (CHUNK - 1, 2 * CHUNK + 2), (3 * CHUNK, None),
                           (len(data) - 3, 100), (len(data), 5), (len(data) + 9, None), (7, 0)]:
        end = None if length is None else offset + length
        assert fs.read("/data/big", offset, length) == data[offset:end], (offset, length)


def test_read_refuses_directories_missing_files_and_negative_ranges(store, fs):
    put_many(store, {"/data/d/f": b"x"})
    with pytest.raises(InvalidArgument, match="directory"):
        fs.read("/data/d")
    with pytest.raises(NotFound):
        fs.read("/data/nope")
    with pytest.raises(InvalidArgument, match="offset"):
        fs.read("/data/d/f", -1)
    with pytest.raises(InvalidArgument, match="length"):
        fs.read("/data/d/f", 0, -2)


def test_list_collapses_subdirectories_and_skips_their_subtrees(store, fs):
    put_many(store, {f"/{top}/sub{j % 7}/f{j:04d}": b"" for top in ("data", "home", "models")
                     for j in range(1000)})
    put_many(store, {"/data/a.txt": b"abc"})
    root = fs.list("/")
    assert [(s.path, s.kind) for s in root] == [("/data", "dir"), ("/home", "dir"), ("/models", "dir")]
    data = fs.list("/data")
    assert [s.path for s in data] == ["/data/a.txt"] + [f"/data/sub{i}" for i in range(7)]
    assert data[0].kind == "file" and data[0].size == 3 and data[0].owner == "alice"
    assert len(fs.list("/data/sub3")) == len(range(3, 1000, 7))
    assert fs.list("/data/a.txt") == [fs.stat("/data/a.txt")]
    assert len(fs.list("/data", limit=2)) == 2
    with pytest.raises(NotFound):
        fs.list("/nothing")


def test_listing_a_wide_tree_seeks_past_subtrees_instead_of_reading_them(store, fs, monkeypatch):
    put_many(store, {f"/d{i}/f{j:04d}": b"" for i in range(3) for j in range(1000)})
    from llmos.drivers.storage import fs as fs_module
    seen = []
    real = fs_module.Inode.unpack
    monkeypatch.setattr(fs_module.Inode, "unpack", staticmethod(lambda raw: seen.append(1) or real(raw)))
    assert [s.path for s in fs.list("/")] == ["/d0", "/d1", "/d2"]
    assert seen == []  # no file record was decoded: each directory cost one seek


def test_stat_of_an_implied_directory_counts_its_entries(store, fs):
    put_many(store, {"/home/bob/a": b"1", "/home/bob/b": b"22", "/home/bob/c/d": b"", "/home/eve/x": b""})
    st = fs.stat("/home/bob")
    assert (st.kind, st.size) == ("dir", 3)
    assert fs.stat("/home").size == 2 and fs.stat("/").kind == "dir"
    assert fs.stat("/home/bob/b").size == 2
    with pytest.raises(NotFound):
        fs.stat("/home/nobody")


def test_walk_yields_every_file_under_a_prefix_across_batches(store, fs, monkeypatch):
    from llmos.drivers.storage import fs as fs_module
    monkeypatch.setattr(fs_module, "WALK_BATCH", 7)
    files = {f"/data/w/{i:03d}": bytes([i]) for i in range(50)}
    put_many(store, {**files, "/data/wx": b"", "/data/v": b""})
    assert [s.path for s in fs.walk("/data/w")] == sorted(files)
    assert [s.path for s in fs.walk("/data/v")] == ["/data/v"]
    assert len(list(fs.walk("/"))) == 52


def test_extents_are_zero_copy_views_into_the_map(writer, store, fs):
    up = writer.submit(ops.Begin("/models/m/weights", "root")).result()
    a = np.arange(1000, dtype=np.float32).tobytes()
    b = np.arange(300, dtype=np.int64).tobytes()
    writer.submit(ops.Append(up, a, new_extent=True)).result()
    writer.submit(ops.Append(up, b[:1000], new_extent=True)).result()
    writer.submit(ops.Append(up, b[1000:])).result()
    assert writer.submit(ops.Commit(up)).result().extents == [len(a), len(b)]
    with store.read() as txn:
        views = fs.extents(txn, "/models/m/weights")
        assert [len(v) for v in views] == [len(a), len(b)]
        assert all(isinstance(v, memoryview) and v.readonly for v in views)
        floats = np.frombuffer(views[0], dtype=np.float32)
        assert floats[999] == 999.0 and not floats.flags.writeable and not floats.flags.owndata
        assert np.frombuffer(views[1], dtype=np.int64).sum() == sum(range(300))
        # the bytes live in the mapping of data.mdb itself, not in a copy on the heap
        address = floats.ctypes.data
        assert any(lo <= address < hi for lo, hi in maps_of(store.path / "data.mdb"))
        assert np.frombuffer(fs.extents(txn, "/models/m/weights")[0], np.uint8).ctypes.data == address


def maps_of(path):
    """The address ranges at which this process maps ``path`` (from /proc/self/maps)."""
    out = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, hi))
    return out
