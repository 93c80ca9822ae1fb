"""Uploads: pieces under a fresh inode, nothing visible before Commit, Abort and gc free the data."""

import os

import pytest

from llmos.drivers.storage import CHUNK, FS, Store, Writer, ops, store_dir
from llmos.drivers.storage.layout import ino_key
from llmos.syscalls.errors import InvalidArgument, NotFound

PIECE = 64 << 10


def data_keys_of(store, ino):
    with store.read() as txn, txn.cursor(db=store.db("data")) as cur:
        prefix = ino_key(ino)
        return [bytes(k) for k in cur.iternext(values=False) if bytes(k).startswith(prefix)]


def upload(writer, path, data, piece=PIECE, commit=True):
    up = writer.submit(ops.Begin(path, "alice")).result(10)
    futs = [writer.submit(ops.Append(up, data[i:i + piece])) for i in range(0, len(data), piece)]
    sizes = [f.result(10) for f in futs]
    assert sizes[-1] == len(data)
    return up, (writer.submit(ops.Commit(up)).result(10) if commit else None)


def test_a_5_mib_upload_in_64_kib_pieces_reads_back_byte_exact_and_only_after_commit(writer, store, fs):
    data = os.urandom(5 << 20) + b"tail"
    writer.submit(ops.Put("/data/blob", b"old", "alice")).result(10)
    up, _ = upload(writer, "/data/blob", data, commit=False)
    assert fs.read("/data/blob") == b"old"  # nothing of the upload is visible yet
    st = writer.submit(ops.Commit(up)).result(10)
    assert st.size == len(data) and st.extents == [CHUNK] * 5 + [4]
    assert fs.read("/data/blob") == data
    with store.read() as txn:
        assert txn.stat(store.db("uploads"))["entries"] == 0  # nothing staged is left behind
        assert txn.stat(store.db("data"))["entries"] == 6  # the old file's data was freed


def test_abort_frees_an_upload_and_its_id_is_gone(writer, store, fs):
    up, _ = upload(writer, "/data/aborted", os.urandom(3 << 20), commit=False)
    assert data_keys_of(store, up)
    writer.submit(ops.Abort(up)).result(10)
    assert data_keys_of(store, up) == []
    with pytest.raises(NotFound):
        fs.stat("/data/aborted")
    for op in (ops.Append(up, b"x"), ops.Commit(up), ops.Abort(up)):
        with pytest.raises(NotFound, match="no such upload"):
            writer.submit(op).result(10)
    with pytest.raises(InvalidArgument):
        writer.submit(ops.Append("7", b"x")).result(10)


def test_an_orphan_upload_is_freed_by_gc_after_a_crash(home):
    with Store(store_dir(home)) as s:
        w = Writer(s).start()
        kept, _ = upload(w, "/data/kept", os.urandom(2 << 20))
        orphan, _ = upload(w, "/data/orphan", os.urandom(3 << 20), commit=False)
        w.stop()  # the "crash": the upload was never committed
    with Store(store_dir(home)) as s:
        assert data_keys_of(s, orphan)
        assert s.gc_orphans() == 1
        assert data_keys_of(s, orphan) == [] and len(data_keys_of(s, kept)) == 2
        with s.read() as txn:
            assert txn.stat(s.db("uploads"))["entries"] == 0
        w = Writer(s).start()
        with pytest.raises(NotFound):
            w.submit(ops.Append(orphan, b"x")).result(10)
        w.stop()
        assert FS(s).stat("/data/kept").size == 2 << 20 and s.gc_orphans() == 0


def test_new_extent_makes_extents_of_exactly_the_sizes_given(writer, store, fs):
    tensors = [os.urandom(n) for n in (3 * PIECE + 5, 7, CHUNK + 3 * PIECE)]
    up = writer.submit(ops.Begin("/models/m/model.safetensors", "root")).result(10)
    writer.submit(ops.Append(up, b"header")).result(10)
    for t in tensors:
        for i in range(0, len(t), PIECE):
            writer.submit(ops.Append(up, t[i:i + PIECE], new_extent=(i == 0))).result(10)
    st = writer.submit(ops.Commit(up)).result(10)
    assert st.extents == [6] + [len(t) for t in tensors]
    with store.read() as txn:
        views = fs.extents(txn, "/models/m/model.safetensors")
        assert [bytes(v) for v in views] == [b"header", *tensors]


def test_an_upload_to_a_directory_is_refused_at_begin(writer):
    writer.submit(ops.Put("/data/d/f", b"", "a")).result(10)
    with pytest.raises(InvalidArgument, match="directory"):
        writer.submit(ops.Begin("/data/d", "a")).result(10)


def test_gc_frees_data_that_no_path_and_no_upload_points_to(store):
    from llmos.drivers.storage.layout import data_key

    store.write_txn(lambda txn: ops.apply(ops.Put("/data/live", b"l" * 10, "a"), txn, store))
    store.write_txn(lambda txn: [txn.put(data_key(999, i), b"stray", db=store.db("data")) for i in range(3)])
    assert store.gc_orphans() == 1
    assert data_keys_of(store, 999) == [] and FS(store).read("/data/live") == b"l" * 10
