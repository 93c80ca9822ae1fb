"""The zombie retention policy, driven with plain records and a fake clock."""

from llmos.kernel.retention import Zombie, to_reap


def z(pid, owner="ann", at=0.0, held=False):
    return Zombie(pid, owner, at, held)


def test_a_zombie_is_reaped_once_the_retention_period_has_passed():
    zs = [z(1, at=0.0), z(2, at=5.0)]
    assert to_reap(zs, now=9.99, ttl_s=10, max_per_owner=100) == []
    assert to_reap(zs, now=10.0, ttl_s=10, max_per_owner=100) == [1]
    assert to_reap(zs, now=15.0, ttl_s=10, max_per_owner=100) == [1, 2]


def test_beyond_the_cap_the_oldest_of_each_owner_are_reaped_at_once():
    zs = [z(1, at=3), z(2, at=1), z(3, at=2), z(4, "bob", at=0), z(5, "bob", at=9)]
    assert to_reap(zs, now=10, ttl_s=600, max_per_owner=2) == [2]
    assert to_reap(zs, now=10, ttl_s=600, max_per_owner=1) == [4, 2, 3]
    assert to_reap(zs, now=10, ttl_s=600, max_per_owner=0) == [4, 2, 3, 1, 5]


def test_a_held_zombie_is_never_reaped_but_counts_towards_the_cap():
    zs = [z(1, at=0, held=True), z(2, at=1), z(3, at=2)]
    assert to_reap(zs, now=1000, ttl_s=10, max_per_owner=100) == [2, 3]
    assert to_reap(zs, now=5, ttl_s=10, max_per_owner=2) == [2]  # 1 is older but held
    assert to_reap([z(1, held=True)], now=1e9, ttl_s=0, max_per_owner=0) == []


def test_ties_in_finish_time_reap_the_lower_pid_first():
    assert to_reap([z(9, at=1), z(4, at=1), z(6, at=1)], now=2, ttl_s=100, max_per_owner=1) == [4, 6]
