"""The kernel's heap policy: garbage cycles left by big requests are collected soon, once the burst ends."""

import gc
import weakref

import pytest

from llmos.kernel.heap import CycleCollector


class FakeLoop:
    """The two loop methods the collector uses, on a clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, object]] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay, fn) -> None:
        self.timers.append((self.now + delay, fn))

    def advance(self, dt: float) -> None:
        end = self.now + dt
        while True:
            due = sorted((t for t in self.timers if t[0] <= end), key=lambda t: t[0])
            if not due:
                break
            self.timers.remove(due[0])
            self.now = due[0][0]
            due[0][1]()
        self.now = end


class Payload:
    pass


def cycle() -> weakref.ref:
    """An object only a reference cycle keeps alive (as a failed future and its traceback's frame do)."""
    a, b = Payload(), Payload()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def no_automatic_gc():
    gc.disable()  # only the collector under test may collect
    yield
    gc.enable()


def test_cycles_are_collected_once_big_requests_stop_and_not_while_they_keep_coming(no_automatic_gc):
    loop = FakeLoop()
    collector = CycleCollector(loop, delay=0.25, most=10.0)
    alive = cycle()
    for _ in range(4):  # a burst: each request postpones the collection
        collector.big_request()
        loop.advance(0.1)
    assert alive() is not None and collector.runs == 0
    loop.advance(0.3)  # quiet for longer than the delay
    assert alive() is None and collector.runs == 1


def test_a_long_burst_is_still_collected_at_least_every_most_seconds(no_automatic_gc):
    loop = FakeLoop()
    collector = CycleCollector(loop, delay=0.25, most=2.0)
    alive = cycle()
    for _ in range(30):  # 3 s of requests 0.1 s apart: never quiet for the delay
        collector.big_request()
        loop.advance(0.1)
    assert alive() is None and collector.runs >= 1
