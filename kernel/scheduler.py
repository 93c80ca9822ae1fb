"""The scheduler: run queues and the one decider of what runs, both pure (no sockets, no loop, time passed in).

``decide`` turns one model instance's run queue, its running set, its parked processes and the
KV use into a :class:`Plan`: whom to admit, whom to preempt (swap or recompute) to make room,
which idle sessions to swap out. The ProcessManager applies the plan by sending the worker
protocol's ``Add``/``Resume``/``Preempt``; the engine only fills each step with what it was given,
as in nano-vllm's ``scheduler.py`` and vLLM v1's ``SchedulerOutput``.

Policies (``SchedParams.policy``):

- ``priority`` (default): nice values -20..19, lower first; FIFO within a level; aging: a READY
  process gains one level per ``aging_s`` seconds of waiting, so a low-priority process always
  progresses. A waiting process preempts a running one when it ranks ``hysteresis`` levels better
  than the running one does; a running process ranks with the level it was admitted at until it
  has run ``quantum_tokens`` tokens (so an aged process is not thrown out at once: no thrashing),
  then with its nice value. Processes of the same nice value never preempt each other: within a
  level the batch runs first come, first served, which is what keeps a batch engine's throughput.
- ``fcfs``: arrival order, no preemption (a plain batch server).
- ``fair``: users take turns: the next admitted process is the best of the user with the fewest
  running; a user with two or more fewer running processes than another may preempt that
  user's last-ranked process (after its quantum).

Aging as a static key: with ``key = nice * aging_s + enqueue_time - credit`` (credit: seconds
already waited before this enqueue), a process's effective level at time ``now`` is
``(key - now) / aging_s``; ``now`` is common to all, so ordering by ``key`` is ordering by aged
priority, and the heap never needs re-sorting (the trick behind virtual-deadline schedulers).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Iterable

from llmos.drivers.model.protocol import BLOCK_SIZE, blocks_for

POLICIES = ("priority", "fcfs", "fair")


class RunQueue:
    """READY pids ordered by a key (lower first), FIFO among equal keys; exactly one entry per pid.

    ``push`` of a queued pid replaces its entry (a renice, a requeue); ``remove`` is O(1) and
    lazy: stale heap entries are skipped by ``peek``/``pop`` and compacted away once they
    outnumber the live ones, so the heap never grows beyond twice the queue.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int]] = []
        self._entry: dict[int, tuple[float, int]] = {}  # pid -> its one live (key, seq)
        self._seq = itertools.count()

    def push(self, pid: int, key: float) -> None:
        entry = (key, next(self._seq))
        self._entry[pid] = entry
        heapq.heappush(self._heap, (*entry, pid))
        if len(self._heap) > 2 * len(self._entry) + 16:
            self._compact()

    def _live(self, item: tuple[float, int, int]) -> bool:
        return self._entry.get(item[2]) == item[:2]

    def peek(self) -> int | None:
        while self._heap and not self._live(self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][2] if self._heap else None

    def pop(self) -> int | None:
        while self._heap:
            item = heapq.heappop(self._heap)
            if self._live(item):
                del self._entry[item[2]]
                return item[2]
        return None

    def remove(self, pid: int) -> bool:
        return self._entry.pop(pid, None) is not None

    def key(self, pid: int) -> float:
        return self._entry[pid][0]

    def _compact(self) -> None:
        self._heap = [item for item in self._heap if self._live(item)]
        heapq.heapify(self._heap)

    def __contains__(self, pid: int) -> bool:
        return pid in self._entry

    def __len__(self) -> int:
        return len(self._entry)

    def head(self, k: int) -> list[int]:
        """The first ``k`` pids in pop order (O(n log k), without touching the queue)."""
        return [pid for _, _, pid in heapq.nsmallest(k, (item for item in self._heap if self._live(item)))]

    def order(self) -> list[int]:
        """The pids in the order they would be popped (for ps, the decider and tests)."""
        return [pid for _, _, pid in sorted(item for item in self._heap if self._live(item))]


@dataclass(frozen=True)
class SchedParams:
    """The policy's knobs. Times in seconds, sizes in tokens or levels."""

    policy: str = "priority"
    aging_s: float = 5.0  # seconds of waiting that raise a READY process by one nice level
    quantum_tokens: int = 32  # tokens a process runs, once admitted, before it may be preempted on its nice value
    hysteresis: int = 1  # levels a waiting process must rank better than a running one to preempt it

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {self.policy!r}: {', '.join(POLICIES)}")
        if self.aging_s <= 0 or self.quantum_tokens < 0 or self.hysteresis < 1:
            raise ValueError("aging_s must be > 0, quantum_tokens >= 0, hysteresis >= 1")


def queue_key(params: SchedParams, nice: int, now: float, waited: float, arrival: float) -> float:
    """The run queue key of a process made READY at ``now`` that already waited ``waited`` seconds."""
    if params.policy == "fcfs":
        return arrival
    return nice * params.aging_s + now - waited


def level(params: SchedParams, key: float, now: float) -> float:
    """A READY process's aged level at ``now`` (its nice value minus the levels its wait earned)."""
    return (key - now) / params.aging_s


@dataclass
class Task:
    """The decider's view of one process: plain numbers, nothing it could change."""

    pid: int
    user: str
    nice: int
    context: int  # tokens whose KV it needs on the device to take its next step (prompt + output so far)
    resident: int = 0  # KV blocks it holds on the device now
    level: float = 0.0  # READY: aged level now; RUNNING: the level it was admitted at
    run_tokens: int = 0  # RUNNING: tokens generated since it was admitted or resumed

    def need(self, block_size: int) -> int:
        """Blocks it needs on the device to run its next step."""
        return blocks_for(self.context + 1, block_size)


@dataclass(frozen=True)
class Capacity:
    """One model instance's room, as the worker reported it (``info``/``stats``), in blocks and seconds."""

    max_batch: int
    kv_total: int  # pool blocks (0: unknown, admit by slots only)
    block_size: int = BLOCK_SIZE
    swap_free: int = 0  # blocks free in the worker's host swap area
    kv_bytes_per_token: int = 0
    swap_bytes_per_s: float = 0.0  # measured copy bandwidth of the swap area
    prefill_tokens_per_s: float = 0.0  # measured prefill speed (recompute cost)
    user_kv_cap: dict[str, int] | None = None  # per-user quota of device blocks (the kernel's quotas)
    kv_used: int = 0  # blocks in use as the worker last reported (a floor under the kernel's own estimate)


@dataclass
class Plan:
    admit: list[int] = field(default_factory=list)  # READY pids to put in the batch, in this order
    preempt: list[tuple[int, str]] = field(default_factory=list)  # RUNNING pids out of the batch, and how
    evict: list[tuple[int, str]] = field(default_factory=list)  # parked (idle) pids whose KV leaves the device
    over_quota: list[int] = field(default_factory=list)  # running pids that alone hold more than their user's cap
    swap_free: int = field(default=0, repr=False, compare=False)  # swap blocks this plan has not yet spent

    def __bool__(self) -> bool:
        return bool(self.admit or self.preempt or self.evict or self.over_quota)

    def switch_out(self, task: Task, cap: Capacity, running: bool) -> None:
        """Take ``task`` off the device (``preempt`` if it runs, else ``evict``), by the cheaper way the swap
        area this plan has left allows."""
        mode = switch_mode(task, cap, self.swap_free)
        if mode == "swap":
            self.swap_free -= task.resident
        (self.preempt if running else self.evict).append((task.pid, mode))


def switch_mode(task: Task, cap: Capacity, swap_free: int) -> str:
    """``swap`` or ``recompute`` for taking ``task`` off the device, by measured cost.

    Swapping copies its blocks out and back (2 x bytes / bandwidth); recomputing prefills its
    context again (tokens / prefill speed). With no measurement yet, swap (exact and, on every
    machine measured so far, far cheaper). Recompute when the swap area lacks room.
    """
    if task.resident <= 0:
        return "recompute"  # nothing on the device to copy
    if task.resident > swap_free:
        return "recompute"
    if cap.swap_bytes_per_s > 0 and cap.prefill_tokens_per_s > 0 and cap.kv_bytes_per_token > 0:
        swap_s = 2 * task.resident * cap.block_size * cap.kv_bytes_per_token / cap.swap_bytes_per_s
        recompute_s = task.context / cap.prefill_tokens_per_s
        if recompute_s < swap_s:
            return "recompute"
    return "swap"


def _run_level(params: SchedParams, t: Task) -> float:
    """A running process's level for preemption: its admitted level during its quantum, then its nice."""
    return t.level if t.run_tokens < params.quantum_tokens else max(t.level, float(t.nice))


def may_preempt(params: SchedParams, cand: Task, victim: Task, running_of: dict[str, int] | None = None) -> bool:
    """True when the waiting ``cand`` may take the running ``victim``'s place."""
    if params.policy == "fcfs":
        return False
    if params.policy == "fair":
        counts = running_of or {}
        return (victim.run_tokens >= params.quantum_tokens
                and counts.get(victim.user, 0) - counts.get(cand.user, 0) >= 2)
    if cand.nice == victim.nice:
        return False  # one level runs first come, first served
    return cand.level + params.hysteresis <= _run_level(params, victim)


def _fair_order(ready: list[Task], running: Iterable[Task]) -> list[Task]:
    """Interleave users: repeatedly the best remaining process of the user running the fewest."""
    count: dict[str, int] = {}
    for t in running:
        count[t.user] = count.get(t.user, 0) + 1
    per_user: dict[str, list[Task]] = {}
    for t in ready:
        per_user.setdefault(t.user, []).append(t)
    out: list[Task] = []
    while per_user:
        user = min(per_user, key=lambda u: (count.get(u, 0), per_user[u][0].level))
        out.append(per_user[user].pop(0))
        count[user] = count.get(user, 0) + 1
        if not per_user[user]:
            del per_user[user]
    return out


def _enforce_kv_quota(params: SchedParams, cap: Capacity, running: list[Task], parked: list[Task],
                      plan: Plan) -> tuple[list[Task], list[Task]]:
    """Bring every user back under its KV cap (a cgroup's memory.max): its idle sessions' KV leaves the
    device first, then its last-ranked running processes are preempted (they wait, READY, until their
    user has room), while more than one of its processes runs; one process that alone holds more than the
    cap is named in ``plan.over_quota`` (the kernel ends it, EDQUOT). Returns what still runs and idles."""
    caps = cap.user_kv_cap or {}
    if not caps:
        return running, parked
    for user, limit in caps.items():
        held = sum(t.resident for t in [*running, *parked] if t.user == user)
        if held <= limit:
            continue
        for t in sorted((t for t in parked if t.user == user and t.resident > 0), key=lambda t: -t.level):
            if held <= limit:
                break
            plan.switch_out(t, cap, running=False)
            parked.remove(t)
            held -= t.resident
        mine = sorted((t for t in running if t.user == user),
                      key=lambda t: (-_run_level(params, t), -t.pid))  # worst first
        while held > limit and len(mine) > 1:
            v = mine.pop(0)
            plan.switch_out(v, cap, running=True)
            running.remove(v)
            held -= v.resident
        if held > limit and mine:
            plan.over_quota.append(mine[0].pid)
            running.remove(mine[0])
    return running, parked


def decide(params: SchedParams, cap: Capacity, ready: list[Task], running: list[Task],
           parked: list[Task] = ()) -> Plan:
    """The plan for one model instance now. Pure: the same inputs give the same plan.

    ``ready``: READY processes in run queue order (best first). ``running``: the batch. ``parked``:
    processes outside the batch whose KV is on the device (idle sessions; they give way first).
    A process is admitted when a batch slot and its blocks are free, or can be freed by swapping
    out idle sessions and preempting running processes it may preempt (``may_preempt``, worst
    ranked first). The first process that cannot be placed stops admission (no overtaking: a
    long prompt at the head is not starved by short ones behind it), except that a process held
    back only by its user's KV quota lets the others pass.
    """
    bs = cap.block_size
    plan = Plan(swap_free=cap.swap_free)
    running, parked = _enforce_kv_quota(params, cap, list(running), list(parked), plan)
    slots = cap.max_batch - len(running)
    # the kernel's estimate, never below what the worker last reported (a guard against resuming into a pool
    # the engine has just found short)
    used = max(sum(t.resident for t in [*running, *parked, *ready]), cap.kv_used)
    free = cap.kv_total - used if cap.kv_total else None
    empty = used == 0  # an empty pool always takes one process: one that can never fit learns it (ENOMEM)
    per_user: dict[str, int] = {}
    for t in [*running, *parked, *ready]:
        per_user[t.user] = per_user.get(t.user, 0) + t.resident
    running_of: dict[str, int] = {}
    for t in running:
        running_of[t.user] = running_of.get(t.user, 0) + 1
    idle = sorted((t for t in parked if t.resident > 0), key=lambda t: -t.level)  # lowest priority first
    victims = sorted(running, key=lambda t: (-_run_level(params, t), t.run_tokens < params.quantum_tokens, -t.pid))
    order = _fair_order(ready, running) if params.policy == "fair" else ready
    for cand in order:
        need = cand.need(bs)
        user_cap = (cap.user_kv_cap or {}).get(cand.user)
        if user_cap is not None and per_user.get(cand.user, 0) - cand.resident + need > user_cap:
            continue  # its user's quota holds it back; others may pass
        grow = need - cand.resident  # blocks it takes beyond what it holds

        def fits(blocks: int | None) -> bool:
            return blocks is None or grow <= blocks

        if not (slots > 0 and (fits(free) or (empty and not plan.admit))):
            # make room: idle sessions' KV first, then running processes this one may preempt, worst first
            evict = []
            out = []
            s, f = slots, free
            for t in idle:
                if fits(f):
                    break
                evict.append(t)
                f += t.resident
            for v in victims:
                if s > 0 and fits(f):
                    break
                if v.pid in plan.admit or not may_preempt(params, cand, v, running_of):
                    continue
                out.append(v)
                s += 1
                if f is not None:
                    f += v.resident
            if not (s > 0 and fits(f)):
                break  # the best waiting process cannot be placed: nobody behind it overtakes
            for t in evict:
                plan.switch_out(t, cap, running=False)
                idle.remove(t)
                per_user[t.user] -= t.resident
            for v in out:
                plan.switch_out(v, cap, running=True)
                victims.remove(v)
                per_user[v.user] -= v.resident
                running_of[v.user] -= 1
            slots, free = s, f
        plan.admit.append(cand.pid)
        slots -= 1
        if free is not None:
            free -= grow
        per_user[cand.user] = per_user.get(cand.user, 0) + grow
        running_of[cand.user] = running_of.get(cand.user, 0) + 1
    return plan
