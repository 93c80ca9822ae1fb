"""The bus fuzzer for 100,000 frames: ``python -m pytest -m soak tests/soak -s`` (deselected by default).

Same checks as tests/e2e/test_fuzz.py, over a run long enough for slow leaks to show; prints the
numbers (frames, seconds, kernel RSS before and after, final frames checked, reference runs).
"""

import os

import pytest

from tests.conftest import KernelProc
from tests.e2e.test_fuzz import run_fuzz

FRAMES = int(os.environ.get("LLMOS_SOAK_FRAMES", "100000"))


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_the_bus_survives_a_long_seeded_fuzz_without_growing(tiny_model):
    k = KernelProc(extra=["--zombie-ttl", "30", "--max-zombies", "8"], tcp=True)
    try:
        report = run_fuzz(k, tiny_model, frames=FRAMES, seed=2024, progress=True)
    finally:
        k.stop()
    mib = 2**20
    print(f"\nsoak: {report.frames} frames in {report.seconds:.0f} s; kernel RSS {report.rss_before / mib:.0f} -> "
          f"{report.rss_after / mib:.0f} MiB (peak {report.rss_peak / mib:.0f} MiB while frames were in flight); "
          f"{report.finals_checked} final frames checked, {report.replies} frames received; "
          f"{report.reference_runs} reference runs")
    assert report.errors == []
    assert report.rss_after - report.rss_before < 50 * 2**20, report
    assert k.proc.returncode == 0, k.logs()
