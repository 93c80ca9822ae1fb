"""A 200 MiB data set imported through a real kernel (deselected by default):
``python -m pytest -m soak tests/soak/test_data_import_soak.py -s``. The importer's peak RSS stays within a few MiB of a 15 MiB import's: it streams."""

import subprocess
import sys

import pytest

from tests.conftest import KernelProc
from tests.e2e.test_data_store import PEAK

LINE = "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt\n"


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_a_200_mib_import_costs_the_importer_what_a_15_mib_one_does(tmp_path):
    k = KernelProc()
    try:
        peaks = {}
        for mib in (15, 200):
            src = tmp_path / f"{mib}.txt"
            n = mib * 2**20 // (len(LINE) + 9)
            with open(src, "w") as fh:
                for i in range(n):
                    fh.write(f"{i:08d} {LINE}")
            r = subprocess.run([sys.executable, "-c", PEAK, "data", "import", str(src), "--name", f"soak{mib}"],
                               env=k.env, capture_output=True, text=True, timeout=1200)
            assert r.returncode == 0, r.stderr
            peaks[mib] = int(r.stdout.split()[-1]) / 1024
            src.unlink()
            with k.client() as c:
                assert c.data.count(f"soak{mib}") == n
                assert c.data.records(f"soak{mib}", n - 1) == [f"{n - 1:08d} {LINE.rstrip()}"]
        print(f"\nimporter peak RSS: {peaks[15]:.1f} MiB for 15 MiB, {peaks[200]:.1f} MiB for 200 MiB")
        assert peaks[200] - peaks[15] < 16
    finally:
        k.stop()
