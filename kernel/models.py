"""The ModelManager actor: one executor (worker process) per loaded model, started on demand."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import zmq.asyncio

from llmos.drivers.model.registry import resolve_model
from llmos.kernel import messages as m
from llmos.kernel.actor import Actor
from llmos.kernel.executor import Executor


class ModelManager(Actor):
    def __init__(self, ctx: zmq.asyncio.Context, run_dir: Path, log_dir: Path, procman: Actor,
                 max_batch: int = 16) -> None:
        super().__init__("models")
        self.ctx = ctx
        self.run_dir = run_dir
        self.log_dir = log_dir
        self.procman = procman
        self.max_batch = max_batch
        self.executors: dict[str, Executor] = {}  # model path -> its executor

    async def receive(self, msg: Any) -> Any:
        if isinstance(msg, m.Acquire):
            return self._acquire(msg.model)
        if isinstance(msg, m.ExecutorGone):
            ex = self.executors.get(msg.key)
            if ex is not None and ex.dead:
                del self.executors[msg.key]
                await ex.stop()
            return None
        if isinstance(msg, m.ListModels):
            return [ex.describe() for ex in self.executors.values()]
        if isinstance(msg, m.StopAll):
            exs = list(self.executors.values())
            self.executors.clear()
            await asyncio.gather(*(ex.stop() for ex in exs), return_exceptions=True)
            return None
        raise TypeError(f"models cannot handle {type(msg).__name__}")

    def _acquire(self, model: str | None) -> tuple[str, asyncio.Future]:
        """Return (model path, future of a ready Executor); loads the model when needed."""
        path = resolve_model(model)
        ex = self.executors.get(path)
        if ex is None or ex.dead:
            ex = Executor(self.ctx, self.run_dir, path, self.procman, self._gone, self.log_dir,
                          max_batch=self.max_batch).launch()
            self.executors[path] = ex
        return path, ex.ready

    def _gone(self, ex: Executor) -> None:
        try:
            self.tell(m.ExecutorGone(ex.model_path))
        except Exception:
            pass  # the manager itself is stopping
    
    async def on_stop(self) -> None:
        for ex in self.executors.values():
            await ex.stop()
