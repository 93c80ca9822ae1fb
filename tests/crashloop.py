"""A kill -9 loop: a real kernel killed at random points (mid-prefill, mid-decode, mid-commit) and restarted on
the same home, again and again; then every acknowledged spawn must end with the output an uninterrupted run gives.

Used by tests/e2e/test_durability.py (a few iterations) and tests/soak/test_crash_soak.py (100).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from tests.conftest import KernelProc, wait_for

N_TOKENS = 48
# every result is kept until the end's check: retention (which reaps unwaited ZOMBIEs by age and count, by design)
# must not take them first
KEEP_ALL = ["--zombie-ttl", "86400", "--max-zombies", "1000000"]
# prompts of several lengths: the long ones are still prefilling when a kill comes right after their spawn
PROMPTS = ["a", "the kernel", "résumé of a crash " * 4, "once upon a time " * 40, "x y z " * 120, "中文 " * 30]


@dataclass
class LoopReport:
    iterations: int = 0
    points: dict[str, int] = field(default_factory=dict)
    acknowledged: int = 0
    lost: list[int] = field(default_factory=list)
    differing: list[int] = field(default_factory=list)
    restart_s: list[float] = field(default_factory=list)
    why: list[str] = field(default_factory=list)  # what each lost one gave

    def summary(self) -> str:
        mean = sum(self.restart_s) / max(1, len(self.restart_s))
        return (f"{self.iterations} kills ({', '.join(f'{k} {v}' for k, v in sorted(self.points.items()))}); "
                f"{self.acknowledged} acknowledged spawns: {len(self.lost)} lost, {len(self.differing)} differing "
                f"greedy outputs; restart to ready {mean:.1f} s on average" + (f"; lost: {self.why[:5]}" if self.why else ""))


def greedy(model: str) -> dict:
    return dict(model=model, max_new_tokens=N_TOKENS, temperature=0.0, ignore_eos=True)


def crash_loop(model: str, iterations: int, seed: int = 0) -> LoopReport:
    """Run the loop on ``model``; returns what it saw (the caller asserts)."""
    rng = random.Random(seed)
    report = LoopReport()
    k = KernelProc(extra=KEEP_ALL)
    home = k.home
    try:
        with k.client() as c:
            refs = {p: c.wait(c.spawn(prompt=p, **greedy(model))).token_ids for p in PROMPTS}
        acked: dict[int, str] = {}
        for _ in range(iterations):
            point = rng.choice(["prefill", "decode", "commit"])
            report.points[point] = report.points.get(point, 0) + 1
            with k.client() as c:
                if point == "prefill":  # long prompts, killed right after they are acknowledged
                    for p in rng.sample(PROMPTS[3:], 2):
                        acked[c.spawn(prompt=p, **greedy(model))] = p
                    time.sleep(rng.uniform(0, 0.02))
                elif point == "decode":  # killed after some tokens
                    pids = []
                    for p in rng.sample(PROMPTS, 2):
                        pid = c.spawn(prompt=p, **greedy(model))
                        acked[pid] = p
                        pids.append(pid)
                    goal = rng.randint(1, N_TOKENS - 1)
                    wait_for(lambda: any(c.stat(q).output_tokens >= goal or c.stat(q).state == "ZOMBIE"
                                         for q in pids), timeout=60, what="tokens")
                else:  # a burst of spawns: the kill lands while their records and checkpoints commit
                    for p in rng.choices(PROMPTS, k=6):
                        acked[c.spawn(prompt=p, **greedy(model))] = p
            k.crash()
            report.iterations += 1
            t = time.monotonic()
            k = KernelProc(home=home, extra=KEEP_ALL)
            report.restart_s.append(time.monotonic() - t)
        report.acknowledged = len(acked)
        with k.client() as c:
            for pid, prompt in sorted(acked.items()):
                try:
                    r = c.wait(pid, timeout=120)
                except Exception as exc:
                    report.lost.append(pid)
                    report.why.append(f"{pid}: {exc!r}"[:200])
                    continue
                if r.finish_reason != "length" or r.error is not None:
                    report.lost.append(pid)
                    report.why.append(f"{pid}: {r.finish_reason} {r.error}"[:200])
                elif r.token_ids != refs[prompt]:
                    report.differing.append(pid)
            fresh = c.spawn(prompt="after", **greedy(model))
            assert fresh > max(acked, default=0), "a pid was reused"
            c.wait(fresh)
    finally:
        k.stop()
    return report
