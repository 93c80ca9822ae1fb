"""Fixtures for the storage driver's tests: a real LMDB store in a private temporary directory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from llmos.drivers.storage import FS, Store, Writer, store_dir


@pytest.fixture
def home():
    path = Path(tempfile.mkdtemp(prefix="llmos-store-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def store(home):
    s = Store(store_dir(home), map_size=8 << 20).open()
    yield s
    s.close()


@pytest.fixture
def writer(store):
    w = Writer(store).start()
    yield w
    w.stop()


@pytest.fixture
def fs(store):
    return FS(store)
