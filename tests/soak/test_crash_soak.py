"""The kill -9 soak: 100 kills of a real kernel at random points, then every acknowledged spawn checked.

``python -m pytest -m soak tests/soak/test_crash_soak.py -s`` (deselected by default; `.ci/run` runs it in
its soak step). ``LLMOS_CRASH_ITERATIONS`` changes the count. Prints what it saw (docs/performance.md).
"""

import os

import pytest

from tests.crashloop import crash_loop

ITERATIONS = int(os.environ.get("LLMOS_CRASH_ITERATIONS", "100"))


@pytest.mark.soak
@pytest.mark.timeout(7200)
def test_a_hundred_kernel_kills_lose_no_acknowledged_spawn_and_change_no_greedy_output(tiny_model):
    report = crash_loop(tiny_model, iterations=ITERATIONS, seed=2026)
    print(f"\ncrash soak: {report.summary()}")
    assert report.iterations == ITERATIONS
    assert report.lost == [] and report.differing == [], report.summary()
