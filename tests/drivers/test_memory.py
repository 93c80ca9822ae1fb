import pytest

from llmos.drivers.memory import KVBlockPool, blocks_for
from llmos.syscalls.errors import OutOfMemory


def test_blocks_are_handed_out_per_process_and_all_come_back():
    pool = KVBlockPool(num_blocks=9, block_size=4)
    assert pool.capacity == 8 and pool.inventory()["blocks"] == 8
    a = pool.ensure(1, 10, "ann")  # 3 blocks
    b = pool.ensure(2, 4, "bob")  # 1 block
    assert len(a) == 3 and len(b) == 1 and 0 not in a + b  # block 0 is the padding block
    assert pool.ensure(1, 12, "ann") == []  # already holds 12 slots
    u = pool.usage()
    assert (u.used, u.free, u.per_user, u.per_process) == (4, 4, {"ann": 3, "bob": 1}, {1: 3, 2: 1})
    assert pool.free(1) == 3 and pool.free(2) == 1 and pool.free(2) == 0
    u = pool.usage()
    assert u.used == 0 and u.free == 8 and u.per_user == {} and u.per_process == {}


def test_an_allocation_that_does_not_fit_is_refused_whole():
    pool = KVBlockPool(num_blocks=4, block_size=2)
    pool.ensure(1, 4)
    with pytest.raises(OutOfMemory):
        pool.ensure(2, 4)
    assert pool.usage().per_process == {1: 2}


def test_user_caps_isolate_users():
    pool = KVBlockPool(num_blocks=20, block_size=1, default_user_cap=5, user_caps={"vip": 10})
    pool.ensure(1, 5, "ann")
    with pytest.raises(OutOfMemory, match="cap is 5"):
        pool.ensure(2, 1, "ann")
    pool.ensure(3, 10, "vip")
    assert not pool.can_allocate(1, "vip") and pool.can_allocate(4, "bob")


def test_a_pool_grows_and_an_empty_one_resets():
    pool = KVBlockPool(num_blocks=3, block_size=1)
    pool.ensure(1, 2)
    pool.grow(6)
    assert pool.free_blocks == 3 and pool.ensure(2, 3)
    with pytest.raises(RuntimeError):
        pool.reset(3)
    pool.free(1)
    pool.free(2)
    pool.reset(3)
    assert pool.capacity == 2 and pool.free_blocks == 2


def test_blocks_for_rounds_up():
    assert [blocks_for(n, 8) for n in (1, 8, 9, 16, 17)] == [1, 1, 2, 2, 3]
