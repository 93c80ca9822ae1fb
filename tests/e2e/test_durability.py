"""A kernel killed with -9 loses nothing: results, unfinished processes, sessions, pids; wait and stream go on."""

import os

import pytest

from tests.conftest import KernelProc, wait_for
from tests.crashloop import crash_loop


@pytest.mark.slow
def test_a_kernel_killed_mid_generation_resumes_every_process_after_a_restart(tiny_model):
    g = dict(model=tiny_model, temperature=0.0, ignore_eos=True)
    k = KernelProc()
    home = k.home
    try:
        with k.client() as c:
            finished = c.spawn(prompt="done before", max_new_tokens=5, **g)
            c.wait(finished, reap=False)
            running = [c.spawn(prompt=p, max_new_tokens=200, **g) for p in ("one", "two", "three", "four")]
            stopped = c.spawn(prompt="stopped", max_new_tokens=30, **g)
            wait_for(lambda: c.stat(stopped).output_tokens > 0, what="tokens")
            c.stop(stopped)
            session = c.session(model=tiny_model, temperature=0.0, max_new_tokens=8)
            first = session.send("hello there")
            wait_for(lambda: all(c.stat(p).output_tokens > 3 for p in running), what="every process to generate")
            [worker] = k.worker_pids()
        k.crash()
        wait_for(lambda: not os.path.exists(f"/proc/{worker}") or _zombie(worker), what="the worker to die with it")

        k = KernelProc(home=home)
        with k.client() as c:  # a new client: the pids are still there
            states = {p.pid: p.state for p in c.ps()}
            assert states[finished] == "ZOMBIE" and states[stopped] == "STOPPED"
            assert all(states[p] in ("READY", "RUNNING") for p in running)
            streamed = "".join(c.stream(running[0]))
            results = [c.wait(p, timeout=60) for p in running]
            assert streamed == results[0].text
            assert c.wait(finished).finish_reason == "length"
            c.cont(stopped)
            rs = c.wait(stopped, timeout=60)
            refs = [c.wait(c.spawn(prompt=p, max_new_tokens=200, **g)) for p in ("one", "two", "three", "four")]
            for r, ref in zip(results, refs):
                assert r.finish_reason == "length" and r.token_ids == ref.token_ids and r.text == ref.text
            assert rs.token_ids == c.wait(c.spawn(prompt="stopped", max_new_tokens=30, **g)).token_ids
            fresh = c.spawn(prompt="new", max_new_tokens=2, **g)
            assert fresh > max(running + [stopped, finished, session.pid])
            c.wait(fresh)
            # the session survived, BLOCKED with its context: its next turn is the one an uninterrupted session gives
            assert states[session.pid] == "BLOCKED"
            again = wait_for(lambda: _try(lambda: c.write(session.pid, "and again")), what="the session's model")
            ref = c.session(model=tiny_model, temperature=0.0, max_new_tokens=8)
            assert ref.send("hello there") == first and ref.send("and again") == again.text
        sockets = [p for p in os.listdir(home / "run") if p.startswith("worker-")]
        assert len(sockets) == 1, sockets  # the dead kernel's worker socket was removed
    finally:
        k.stop()


def _try(call):
    from llmos import TryAgain

    try:
        return call()
    except TryAgain:  # its model is still loading after the restart
        return None


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except OSError:
        return True


@pytest.mark.slow
def test_a_kill_minus_9_loop_at_random_points_loses_no_acknowledged_spawn(tiny_model):
    report = crash_loop(tiny_model, iterations=2, seed=1)  # 100 in the soak step (tests/soak/test_crash_soak.py)
    print(report.summary())
    assert report.iterations == 2 and report.acknowledged > 0
    assert report.lost == [] and report.differing == [], report.summary()
