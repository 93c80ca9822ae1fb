"""ops.Rename: a file or a whole tree moves in one transaction by re-keying its inode records."""

from __future__ import annotations

import pytest

from llmos.drivers.storage import ops
from llmos.syscalls.errors import Exists, InvalidArgument, NotFound


def _do(writer, op):
    return writer.submit(op).result(10)


def _extents(store) -> int:
    with store.read() as txn:
        return txn.stat(store.db("data"))["entries"]


def test_a_tree_moves_without_copying_and_keeps_owners(writer, store, fs):
    _do(writer, ops.Put("/data/.stage/a", b"A" * 10, "ann"))
    _do(writer, ops.Put("/data/.stage/sub/b", b"B", "ann"))
    before = {s.path.split("/.stage/")[1]: s for s in fs.walk("/data/.stage")}
    assert _do(writer, ops.Rename("/data/.stage", "/data/set")) == 2
    after = {s.path.split("/set/")[1]: s for s in fs.walk("/data/set")}
    assert fs.read("/data/set/a") == b"A" * 10 and fs.read("/data/set/sub/b") == b"B"
    assert [(s.owner, s.mtime, s.extents) for s in after.values()] == \
        [(s.owner, s.mtime, s.extents) for s in before.values()]
    assert list(fs.walk("/data/.stage")) == []
    assert _extents(store) == 2  # no data was copied


def test_a_taken_destination_is_EEXIST_unless_replace_which_frees_its_data(writer, store, fs):
    _do(writer, ops.Put("/data/set/old1", b"o" * (3 << 20), "ann"))  # 3 extents
    _do(writer, ops.Put("/data/set/old2", b"o", "ann"))
    _do(writer, ops.Put("/data/new/x", b"new", "ann"))
    with pytest.raises(Exists):
        _do(writer, ops.Rename("/data/new", "/data/set"))
    assert fs.read("/data/set/old2") == b"o" and fs.read("/data/new/x") == b"new"  # nothing moved
    assert _do(writer, ops.Rename("/data/new", "/data/set", replace=True)) == 1
    assert [s.path for s in fs.walk("/data/set")] == ["/data/set/x"]
    assert _extents(store) == 1  # the replaced files' data was freed


def test_a_file_moves_onto_a_file(writer, fs):
    _do(writer, ops.Put("/data/f", b"1", "ann"))
    _do(writer, ops.Put("/data/g", b"2", "ann"))
    with pytest.raises(Exists):
        _do(writer, ops.Rename("/data/f", "/data/g"))
    assert _do(writer, ops.Rename("/data/f", "/data/g", replace=True)) == 1
    assert fs.read("/data/g") == b"1"
    with pytest.raises(NotFound):
        fs.stat("/data/f")


def test_bad_renames_change_nothing(writer, fs):
    _do(writer, ops.Put("/data/t/a", b"1", "ann"))
    _do(writer, ops.Put("/data/file", b"2", "ann"))
    with pytest.raises(NotFound):
        _do(writer, ops.Rename("/data/nothing", "/data/x"))
    for src, dst in (("/data/t", "/data/t/in"), ("/data/t/a", "/data/t"), ("/data/t", "/data/t"),
                     ("/data/t", "/data/file/under")):
        with pytest.raises(InvalidArgument):
            _do(writer, ops.Rename(src, dst, replace=True))
    assert [s.path for s in fs.walk("/data")] == ["/data/file", "/data/t/a"]
