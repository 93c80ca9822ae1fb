"""The storage driver: one LMDB environment under $LLMOS_HOME/store, one writer thread, readers anywhere.

Public names: Store (the environment), Writer (the thread every write goes through), FS (the
namespace's read side), Stat, ops (Put, Remove, Begin, Append, Commit, Abort, Call, Flush), normpath,
may (permissions), store_dir, storage_error, StorageError. docs/storage.md describes the layout and
what survives a crash; storage-api.md is the contract.
"""

from llmos.drivers.storage import ops
from llmos.drivers.storage.env import Store, store_dir
from llmos.drivers.storage.errors import StorageError, storage_error
from llmos.drivers.storage.fs import FS
from llmos.drivers.storage.layout import CHUNK, MAX_EXTENT, UPLOAD_IDLE_S, Stat
from llmos.drivers.storage.paths import normpath
from llmos.drivers.storage.perms import may
from llmos.drivers.storage.writer import Writer

__all__ = ["Store", "Writer", "FS", "Stat", "ops", "normpath", "may", "store_dir", "storage_error",
           "StorageError", "CHUNK", "MAX_EXTENT", "UPLOAD_IDLE_S"]
