"""The Store: owner-only files, the fork guard, read-only stores, the map that grows by itself."""

import os
import stat

import lmdb
import pytest

from llmos.drivers.storage import FS, Store, StorageError, ops, store_dir
from llmos.syscalls.errors import InvalidArgument, LLMOSError


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_the_store_is_owner_only_whatever_the_umask(home, umask):
    old = os.umask(umask)
    try:
        s = Store(store_dir(home)).open()
    finally:
        os.umask(old)
    try:
        assert mode(s.path) == 0o700
        assert mode(s.path / "data.mdb") == 0o600 and mode(s.path / "lock.mdb") == 0o600
    finally:
        s.close()


def test_an_existing_store_with_loose_modes_is_tightened_at_open(home):
    s = Store(store_dir(home)).open()
    s.close()
    os.chmod(s.path, 0o755)
    os.chmod(s.path / "data.mdb", 0o644)
    with Store(store_dir(home)) as s2:
        assert mode(s2.path) == 0o700 and mode(s2.path / "data.mdb") == 0o600


def test_a_store_used_in_a_forked_child_raises_storage_error(store):
    store.write_txn(lambda txn: ops.apply(ops.Put("/data/x", b"1", "a"), txn, store))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: every use must refuse, with an EIO-class llmos error saying why
        code = 0
        for use in (lambda: FS(store).read("/data/x"), lambda: store.write_txn(lambda t: None),
                    lambda: store.db("meta")):
            try:
                use()
                code |= 1
            except StorageError as exc:
                if exc.errno.name != "EIO" or "forked child" not in exc.message:
                    code |= 2
            except BaseException:
                code |= 4
        store.close()  # drops the handle without touching the parent's files
        os.write(w, b"done")
        os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    assert os.read(r, 10) == b"done" and os.waitstatus_to_exitcode(status) == 0
    os.close(r)
    assert FS(store).read("/data/x") == b"1"  # the parent's store is untouched


def test_a_read_only_store_reads_but_refuses_writes(home):
    with Store(store_dir(home)) as s:
        s.write_txn(lambda txn: ops.apply(ops.Put("/data/x", b"1", "a"), txn, s))
    with Store(store_dir(home), readonly=True) as ro:
        assert FS(ro).read("/data/x") == b"1"
        with pytest.raises(InvalidArgument, match="read-only"):
            ro.write_txn(lambda txn: None)


def test_the_map_grows_by_itself_from_one_mebibyte(home):
    with Store(store_dir(home), map_size=1 << 20) as s:
        for i in range(8):
            s.write_txn(lambda txn, i=i: ops.apply(ops.Put(f"/data/{i}", bytes([i]) * (1 << 20), "a"), txn, s))
        assert s.map_grows >= 3 and s.map_size >= 8 << 20
        assert all(FS(s).read(f"/data/{i}", 1000, 1) == bytes([i]) for i in range(8))


def test_a_store_that_cannot_be_opened_raises_an_llmos_error(home):
    (home / "store").write_text("a file where the directory should be")
    with pytest.raises(LLMOSError) as err:
        Store(store_dir(home)).open()
    assert err.value.errno.name == "EIO" and not isinstance(err.value, lmdb.Error)
    with pytest.raises(StorageError, match="not open"):
        Store(store_dir(home)).read().__enter__()
