"""Everything LLMOS creates is owner-only (0700 directories, 0600 files), whatever the umask, and what an
older LLMOS left readable is made so; stale worker sockets of a dead kernel are removed at start."""

import os
import stat
import subprocess

import pytest

from llmos.drivers.model import cpu_kernels
from llmos.embedded import open_log
from llmos.kernel.main import prepare_home, remove_stale_sockets
from llmos.shell import history_file


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(autouse=True)
def permissive_umask():
    old = os.umask(0o022)  # what a user's shell usually has: files 0644, directories 0755 unless told otherwise
    yield
    os.umask(old)


def test_embedded_launch_creates_the_home_log_dir_and_kernel_log_owner_only(tmp_path):
    log = open_log(tmp_path / "new" / "home")
    assert log == tmp_path / "new/home/log/kernel.log"
    assert (mode(tmp_path / "new/home"), mode(tmp_path / "new/home/log"), mode(log)) == (0o700, 0o700, 0o600)


def test_embedded_launch_makes_an_older_log_dir_and_log_owner_only(tmp_path):
    (tmp_path / "log").mkdir(mode=0o755)
    (tmp_path / "log/kernel.log").write_text("old\n")
    os.chmod(tmp_path / "log/kernel.log", 0o644)
    open_log(tmp_path)
    assert (mode(tmp_path / "log"), mode(tmp_path / "log/kernel.log")) == (0o700, 0o600)
    assert (tmp_path / "log/kernel.log").read_text() == "old\n"  # appended to, never truncated


def test_the_kernel_brings_its_home_run_and_logs_to_owner_only(tmp_path):
    home = tmp_path / "h"
    (home / "log").mkdir(parents=True)
    (home / "log/worker-w1.log").write_text("x")
    for p, m in ((home, 0o755), (home / "log", 0o755), (home / "log/worker-w1.log", 0o644)):
        os.chmod(p, m)
    run = prepare_home(home)
    assert {p.name: mode(p) for p in (home, run, home / "log", home / "log/worker-w1.log")} == {
        "h": 0o700, "run": 0o700, "log": 0o700, "worker-w1.log": 0o600}
    fresh = prepare_home(tmp_path / "fresh")
    assert mode(tmp_path / "fresh") == 0o700 and mode(fresh) == 0o700


def test_a_users_own_directory_used_as_home_keeps_its_mode(tmp_path):
    (tmp_path / "project.txt").write_text("mine")
    os.chmod(tmp_path, 0o755)
    prepare_home(tmp_path)
    assert mode(tmp_path) == 0o755 and mode(tmp_path / "run") == 0o700 and mode(tmp_path / "log") == 0o700


def test_stale_worker_sockets_of_dead_kernels_are_removed_and_a_live_kernels_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "30"])  # alive, but not a kernel: its sockets are stale too
    try:
        names = [f"worker-{dead.pid}-w1.sock", f"worker-{dead.pid}-w2.sock", f"worker-{live.pid}-w1.sock",
                 f"worker-{os.getpid()}-w3.sock", "kernel.sock.lock", "worker-notapid.sock"]
        for n in names:
            (tmp_path / n).touch()
        removed = remove_stale_sockets(tmp_path)
        assert sorted(removed) == sorted(names[:4])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["kernel.sock.lock", "worker-notapid.sock"]
    finally:
        live.kill()
        live.wait()


def test_the_shell_history_which_holds_prompts_is_owner_only(tmp_path):
    path = history_file(tmp_path / "home")
    assert (mode(tmp_path / "home"), mode(path)) == (0o700, 0o600)
    os.chmod(path, 0o644)
    path.write_text("run secret prompt\n")
    assert history_file(tmp_path / "home") == path and mode(path) == 0o600
    assert path.read_text() == "run secret prompt\n"


def test_the_native_kernel_cache_is_owner_only_where_llmos_made_it(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMOS_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    target = cpu_kernels.cache_dir()
    assert target == tmp_path / "cache/llmos/kernels"
    assert cpu_kernels._writable(target) == target
    assert {p: mode(p) for p in (tmp_path / "cache", target.parent, target)} == dict.fromkeys(
        (tmp_path / "cache", target.parent, target), 0o700)
    os.chmod(target, 0o755)
    os.chmod(target.parent, 0o755)  # what an older LLMOS made
    cpu_kernels._writable(target)
    assert (mode(target.parent), mode(target)) == (0o700, 0o700)


def test_a_built_kernel_library_is_owner_only(monkeypatch):
    if not (os.environ.get("CC") or cpu_kernels.shutil.which("cc") or cpu_kernels.shutil.which("gcc")):
        pytest.skip("no C compiler")
    lib = cpu_kernels._build()  # the test session's private cache: built once, shared with the e2e workers
    assert mode(lib) == 0o600 and mode(lib.parent) == 0o700
