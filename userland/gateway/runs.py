"""The processes behind one request: spawned (n per prompt) or a session's turn, streamed, reaped.

A Run owns its pids from spawn to reap: ``deltas()`` merges their output as it is generated, reaps each
process once it has ended (``wait``) and leaves one Outcome per choice; ``end()`` sends TERM to what is
still running and reaps it, for a client that went away or a request that failed half-way. Nothing a
Run spawned is left behind, finished or not.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from llmos.aclient import AsyncClient
from llmos.syscalls import protocol
from llmos.syscalls.errors import Errno, LLMOSError, NoSuchProcess
from llmos.types import TurnResult

SEED_RANGE = 2**63  # the kernel's seeds are 0..2**63-1 (syscalls/table.py): seed + j wraps within it


@dataclass
class Outcome:
    """One choice once its process (or turn) ended. ``finish_reason`` is the kernel's (stop, length, killed,
    closed, error); ``token_texts``: each output token's share of the text (see :func:`align`);
    ``logprobs``: each output token's natural log-probability given its prefix, when asked for."""

    index: int
    pid: int
    text: str
    token_ids: list[int]
    finish_reason: str
    error: dict[str, Any] | None
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    token_texts: list[str] = field(default_factory=list)
    logprobs: list[float] | None = None


@dataclass(frozen=True)
class Delta:
    """New output of choice ``index``: its text and token ids (either may be empty)."""

    index: int
    text: str
    token_ids: list[int]


class Failed(Exception):
    """A consumer of the run's processes failed (the kernel went away, a call was refused): ``error``."""

    def __init__(self, error: LLMOSError) -> None:
        super().__init__(error.message)
        self.error = error


def align(chunks: list[tuple[str, list[int]]], total: int) -> list[str]:
    """Each token's share of the text, from the stream's chunks (text, token ids): a chunk's text goes to its
    last token (the one that completed it: a character split over tokens shows on the token that ends it);
    text that comes without tokens (held back until a stop string could no longer match) joins the token
    before it. The shares always concatenate to the streamed text; ``total`` tokens in all."""
    texts: list[str] = []
    pending = ""
    for text, ids in chunks:
        if ids:
            texts.extend([""] * len(ids))
            texts[-1] = pending + text
            pending = ""
        elif texts:
            texts[-1] += text
        else:
            pending += text
    texts.extend([""] * (total - len(texts)))
    if pending and texts:
        texts[0] = pending + texts[0]
    return texts[:total] if total else texts


class Run:
    """The processes of one request, on one client (the requesting user's connection).

    ``on_first_token``: called once, when the first output of any choice arrives (the gateway's TTFT).
    """

    def __init__(self, client: AsyncClient, model: str, on_first_token: Callable[[], None] | None = None) -> None:
        self.client, self.model = client, model
        self.pids: list[int] = []  # index -> pid
        self.live: set[int] = set()  # spawned and not reaped (a session: not yet replied)
        self.outcomes: list[Outcome | None] = []
        self.session: int | None = None  # the session pid this run's reply belongs to
        self.session_over = False  # the session ended with this run (a turn ended it, or end() did)
        self._turn: tuple[str, str] | None = None
        self._first = on_first_token
        self._tasks: list[asyncio.Task] = []
        self.want_logprobs = False  # read each process's prompt ids before it is reaped (add_logprobs)
        self._prompt_ids: dict[int, list[int]] = {}

    async def spawn(self, inputs: list[dict[str, Any]], n: int, params: dict[str, Any], priority: int) -> None:
        """n processes per input (a choice each, input-major); choice j of an input gets seed + j (modulo
        2**63, the kernel's seed range), so that the n choices differ and the same seed repeats them all. On
        a refusal, what was spawned is ended and reaped, then the error is raised."""
        try:
            for inp in inputs:
                for j in range(n):
                    p = dict(params)
                    if "seed" in p:
                        p["seed"] = (p["seed"] + j) % SEED_RANGE
                    pid = await self.client.spawn(model=self.model, priority=priority, **inp, **p)
                    self.pids.append(pid)
                    self.live.add(pid)
        except BaseException:
            await self.end()
            raise
        self.outcomes = [None] * len(self.pids)

    async def open_session(self, messages: list[dict[str, str]] | None, params: dict[str, Any],
                           priority: int) -> None:
        """Spawn a session process (``messages`` before the turn: a system prompt, earlier turns; none: it
        starts BLOCKED); the run's turn then goes to it with :meth:`turn`."""
        extra = {"messages": messages} if messages else {}
        pid = await self.client.spawn(model=self.model, priority=priority, session=True, **extra, **params)
        self.session = pid
        self.live.add(pid)

    def turn(self, pid: int, content: str, role: str) -> None:
        """This run's reply is the next turn of session ``pid`` (sent when :meth:`deltas` runs)."""
        self.session = pid
        self.pids, self.outcomes = [pid], [None]
        self._turn = (content, role)

    async def deltas(self) -> AsyncIterator[Delta | Outcome]:
        """The output of every choice as generated (interleaved), and each choice's Outcome once its process
        ended and was reaped; then ``outcomes`` holds every choice. Raises Failed when a choice could not be
        followed (``end()`` then ends what is left)."""
        q: asyncio.Queue = asyncio.Queue()
        if self._turn is not None:
            self._tasks = [asyncio.get_running_loop().create_task(self._follow_turn(q))]
        else:
            self._tasks = [asyncio.get_running_loop().create_task(self._follow(i, pid, q))
                           for i, pid in enumerate(self.pids)]
        running = len(self._tasks)
        first = self._first
        while running:
            item = await q.get()
            if isinstance(item, Failed):
                raise item
            if isinstance(item, Outcome):
                running -= 1
                yield item
            else:
                if first is not None and (item.text or item.token_ids):
                    first()
                    first = None
                yield item

    async def _follow(self, index: int, pid: int, q: asyncio.Queue) -> None:
        chunks: list[tuple[str, list[int]]] = []
        try:
            result: dict[str, Any] = {}
            async for kind, payload in self.client.stream_frames(pid):  # token ids too (logprobs)
                if kind == protocol.OK:
                    result = payload
                    break
                text, ids = payload.get("text") or "", list(payload.get("token_ids") or [])
                chunks.append((text, ids))
                q.put_nowait(Delta(index, text, ids))
            ids = list(result.get("token_ids") or [])
            stats = result.get("stats") or {}
            self.outcomes[index] = Outcome(
                index, pid, result.get("text", ""), ids, result.get("finish_reason") or "error", result.get("error"),
                int(stats.get("prompt_tokens") or 0), int(stats.get("output_tokens") or len(ids)),
                token_texts=align(chunks, len(ids)))
            if self.want_logprobs:  # /proc/<pid> goes with the process: read before the reap
                self._prompt_ids[pid] = json.loads(await self.client.fs_get(f"/proc/{pid}/prompt_ids"))
            await self._reap(pid)
            q.put_nowait(self.outcomes[index])
        except LLMOSError as exc:
            q.put_nowait(Failed(exc))

    async def _follow_turn(self, q: asyncio.Queue) -> None:
        assert self._turn is not None and self.session is not None
        pid = self.session
        self.live.add(pid)  # a turn under way: a client that goes away ends the session (see end())
        try:
            stream = self.client.write_stream(pid, *self._turn)
            async for text in stream:
                q.put_nowait(Delta(0, text, []))
            r: TurnResult | None = stream.result
            assert r is not None, "a write stream ends with the turn's result"
            prompt = max(r.stats.context_tokens - r.stats.output_tokens, 0)
            self.outcomes[0] = Outcome(0, pid, r.text, list(r.token_ids), r.finish_reason, r.error, prompt,
                                       r.stats.output_tokens, cached_tokens=max(prompt - r.stats.prefill_tokens, 0))
            if r.state == "ZOMBIE":  # the turn ended the session (a deadline, an error): reap it
                self.session_over = True
                await self._reap(pid)
            self.live.discard(pid)
            q.put_nowait(self.outcomes[0])
        except LLMOSError as exc:
            q.put_nowait(Failed(exc))

    async def add_logprobs(self) -> None:
        """Each choice's chosen-token log-probabilities: the kernel scores the prompt's ids and the output's
        (``score``), and output token j's is the log-probability at the prompt's length + j."""
        for o in self.outcomes:
            if o is None or not o.token_ids:
                if o is not None:
                    o.logprobs = []
                continue
            prompt = self._prompt_ids[o.pid]
            scored = await self.client.score(model=self.model, prompt_ids=prompt + o.token_ids)
            o.logprobs = list(scored["logprobs"][len(prompt) - 1:])

    async def _reap(self, pid: int) -> None:
        try:
            await self.client.wait(pid)
        except NoSuchProcess:
            pass  # reaped already (zombie retention, or an admin's wait)
        self.live.discard(pid)

    async def end(self) -> None:
        """TERM and reap what is still live (a session under a turn is ended too: its turn cannot be cut
        alone); safe to call twice, and after everything ended."""
        for t in self._tasks:
            t.cancel()
        for pid in sorted(self.live):
            if pid == self.session:
                self.session_over = True
            try:
                await self.client.kill(pid, "TERM")
                await self.client.wait(pid, timeout=30.0)
            except NoSuchProcess:
                pass
            except LLMOSError as exc:
                if exc.errno is not Errno.ESRCH:
                    raise
            self.live.discard(pid)
