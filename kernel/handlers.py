"""Syscall handlers: each ``sys_<name>`` takes validated args, delegates to an actor, shapes the reply.

Handlers hold no state of their own; the table in ``llmos.syscalls.table`` says which exist,
and tests/syscalls/test_table.py proves every syscall has one here.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from llmos.drivers.model import protocol as wp
from llmos.kernel import __version__
from llmos.kernel import messages as m
from llmos.kernel.audit import Audit
from llmos.kernel.files import Files
from llmos.kernel.delegation import DELEGATED, Delegation
from llmos.kernel.model_access import check_model_access, is_model_dir
from llmos.syscalls import protocol
from llmos.syscalls.errors import InvalidArgument, NotPermitted, ProtocolError, TimedOut

Emit = Callable[[Any], Awaitable[None]]
SETTLE_S = 10.0  # longest a result waits for its journal commit before it is returned anyway


@dataclass(frozen=True)
class Caller:
    """Who is calling: one client connection (its bus identity) and the user its transport proves.

    The Bus makes one Caller per connection from the transport (kernel/identity.py: the peer's uid
    over ipc, its CURVE key over tcp) and hands it to every request of that connection; nothing a
    client sends changes it. ``admin``: the user is the kernel's owner or root. ``transport``: ipc,
    curve or insecure; "delegated" for a call made for ``user`` by ``by``, a delegate (kernel/delegation.py).
    """

    identity: bytes
    user: str = "anonymous"
    admin: bool = False
    transport: str = "insecure"
    uid: int | None = None  # the peer's uid over ipc (None over tcp): whose rights a model directory is read with
    by: str | None = None  # the delegate that made this call for ``user`` (None: the user itself)

    def acting_for(self, target: str, delegation: Delegation) -> "Caller":
        """This connection's call made for ``target``: itself when it is the same user; EPERM (NotPermitted)
        when the delegation rules do not allow it, EINVAL for a bad name."""
        user = delegation.check(self.user, self.admin, target)
        if user == self.user:
            return self
        return Caller(self.identity, user, self.admin and user in delegation.admins, DELEGATED, None, self.user)


class Handlers:
    def __init__(self, kernel: Any) -> None:
        self.k = kernel  # the Kernel: its actors and identity; handlers only read it
        self.files = Files(kernel)  # the fs calls' open uploads live there
        self.audit = Audit()  # refused calls and administrative actions, to the kernel log (dmesg)

    async def may_use_model(self, caller: Caller, model: str | None) -> None:
        """NotPermitted (EPERM) when ``caller`` may not have the kernel read the model directory ``model``
        (kernel/model_access.py: the kernel reads with its own rights, so a user names only what it could read)."""
        if caller.admin or is_model_dir(model) is None:
            return
        loaded = {d["model"] for d in await self.k.models.ask(m.ListModels())}
        await asyncio.to_thread(check_model_access, model, caller.admin, caller.uid, caller.transport, self.k.home,
                                loaded)

    async def owner_of(self, pid: int) -> str:
        """The owner of process ``pid`` (NoSuchProcess, ESRCH, when there is none): the dispatcher's
        access check for calls on a process."""
        return await self.k.procman.ask(m.Owner(pid))

    async def sys_hello(self, caller: Caller, args: dict, emit: Emit) -> dict:
        if args["version"] != protocol.PROTOCOL_VERSION:
            raise ProtocolError(f"client speaks protocol {args['version']}, kernel speaks "
                                f"{protocol.PROTOCOL_VERSION}")
        if args["user"] is not None and args["user"] != caller.user:
            raise NotPermitted(f"this connection is user {caller.user} (proven by its {caller.transport} "
                               f"transport), not {args['user']}: a client cannot choose who it is")
        return {"version": protocol.PROTOCOL_VERSION, "kernel_version": __version__, "pid": os.getpid(),
                "started": self.k.started, "max_frame_bytes": protocol.MAX_FRAME_BYTES, "user": caller.user,
                "admin": caller.admin, "transport": caller.transport, "by": caller.by}

    async def sys_ping(self, caller: Caller, args: dict, emit: Emit) -> dict:
        # pid and start time: a client connected across a restart on the same address tells kernels apart
        return {"time": time.time(), "pid": os.getpid(), "started": self.k.started}

    async def sys_kernel_info(self, caller: Caller, args: dict, emit: Emit) -> dict:
        counts = await self.k.procman.ask(m.Counts())
        models = [ex for d in await self.k.models.ask(m.ListModels()) for ex in d["executors"]]
        return {"pid": os.getpid(), "address": self.k.address, "uptime_s": time.time() - self.k.started,
                "version": __version__, "home": str(self.k.home), "processes": counts, "models": models,
                "listeners": [{"address": a, "transport": t} for a, t in self.k.plan], "owner": self.k.owner,
                "group": self.k.config.group, "delegates": self.k.config.delegate,
                "metrics_url": self.k.metrics_url, "ray": self.k.ray.describe() if self.k.ray else None}

    async def sys_shutdown(self, caller: Caller, args: dict, emit: Emit) -> dict:
        self.k.request_shutdown(f"shutdown syscall from {caller.user}")
        return {"stopping": True}

    async def sys_spawn(self, caller: Caller, args: dict, emit: Emit) -> dict:
        prompt, messages, ids = args.pop("prompt"), args.pop("messages"), args.pop("prompt_ids")
        session, deadline, queue_timeout = args.pop("session"), args.pop("deadline"), args.pop("queue_timeout")
        given = sum(x is not None for x in (prompt, messages, ids))
        if given != 1 and not (session and given == 0):
            raise InvalidArgument("give exactly one of 'prompt', 'messages' and 'prompt_ids'"
                                  + (" (or none, for a session that starts waiting for a write)" if session else ""))
        if session and ids is not None:
            raise InvalidArgument("a session takes 'prompt' or 'messages' (its turns are text), not 'prompt_ids'")
        model, priority, keep_alive = args.pop("model"), args.pop("priority"), args.pop("keep_alive")
        capture, ticket = self.k.capture.request(args), None  # the capture fields leave args (EINVAL for bad ones)
        await self.may_use_model(caller, model)
        path, ready, token = await self.k.models.ask(m.Acquire(model, keep_alive))
        try:
            executors = await ready_executors(ready, any_ready=True)
            if capture is not None:  # checked against the model; its spec travels in the params to the worker
                ticket = await self.k.capture.admit(caller.user, capture, executors[0].info, session)
                if ticket.params is not None:
                    args["capture"] = ticket.params
            prompt_ids = await (await executors[0].ask(m.Encode(prompt, messages, ids))) if given else []
            pid = await self.k.procman.ask(m.Spawn(caller.user, path, executors, prompt_ids, priority, args,
                                                   session=session, deadline=deadline, queue_timeout=queue_timeout,
                                                   messages=messages, prompt=prompt))
            if isinstance(pid, asyncio.Future):  # acknowledged once the journal has committed its record
                pid = await pid
        except BaseException:
            self.k.capture.release(ticket)
            raise
        finally:
            self.k.models.tell(m.Release(token))
        self.k.capture.bind(ticket, pid)
        return {"pid": pid}

    async def sys_wait(self, caller: Caller, args: dict, emit: Emit) -> dict:
        fut = await self.k.procman.ask(m.Wait(args["pid"], caller.user, args["reap"]))
        try:  # a result waits for its process's capture to be stored (kernel/capture.py)
            return await self._settled(await asyncio.wait_for(asyncio.shield(fut), args["timeout"]))
        except asyncio.TimeoutError:
            await self.k.procman.ask(m.CancelWait(args["pid"], fut))
            if fut.done():  # it finished (and maybe was reaped) just as the deadline passed
                return fut.result()
            raise TimedOut(f"process {args['pid']} did not finish within {args['timeout']} s") from None
        except asyncio.CancelledError:  # the caller is gone: its wait must not reap a result nobody receives
            self.k.procman.tell(m.CancelWait(args["pid"], fut))
            raise

    async def sys_kill(self, caller: Caller, args: dict, emit: Emit) -> dict:
        return await self.k.procman.ask(m.Kill(args["pid"], args["signal"], caller.user))

    async def sys_ps(self, caller: Caller, args: dict, emit: Emit) -> dict:
        return await self.k.procman.ask(m.Ps())

    async def sys_stat(self, caller: Caller, args: dict, emit: Emit) -> dict:
        return await self.k.procman.ask(m.Stat(args["pid"], caller.user))

    async def sys_stream(self, caller: Caller, args: dict, emit: Emit) -> dict:
        q = await self.k.procman.ask(m.Subscribe(args["pid"], caller.user))
        return await self._relay(args["pid"], q, emit)

    async def _relay(self, pid: int, q: asyncio.Queue, emit: Emit) -> dict:
        """Emit a subscription's chunks until its end; return the final result."""
        from llmos.kernel.procman import END

        try:
            while True:
                item = await q.get()
                if isinstance(item, tuple) and item[0] is END:
                    return await self._settled(item[1])
                await emit(item)
        finally:
            try:
                self.k.procman.tell(m.Unsubscribe(pid, q))
            except Exception:
                pass

    async def _settled(self, result: dict) -> dict:
        """A final result (or a session turn's), once its process's capture is stored and its journal record
        committed: a result a client has been given survives a kernel crash."""
        result = await self.k.capture.complete(result)
        if getattr(self.k, "journal", None) is not None:
            committed = await self.k.procman.ask(m.Checkpoint())
            if committed is not None:
                try:  # a store that stalls must not hold every waiter: the result goes out, the journal catches up
                    await asyncio.wait_for(asyncio.shield(committed), SETTLE_S)
                except asyncio.TimeoutError:
                    self.k.log.warning("journal_commit_slow", waited_s=SETTLE_S, pid=result.get("pid"))
                except Exception:  # a failed commit is the journal's to report (and to retry)
                    pass
        return result

    async def sys_nice(self, caller: Caller, args: dict, emit: Emit) -> dict:
        return await self.k.procman.ask(m.Nice(args["pid"], args["priority"], caller.user))

    async def sys_write(self, caller: Caller, args: dict, emit: Emit) -> dict:
        pid = args["pid"]
        executor, encode = await self.k.procman.ask(m.PrepareTurn(pid, caller.user, args["content"], args["role"]))
        try:
            ids = await (await executor.ask(encode))
        except BaseException:
            self.k.procman.tell(m.CancelTurn(pid))
            raise
        q = await self.k.procman.ask(m.StartTurn(pid, caller.user, ids))
        return await self._relay(pid, q, emit)

    async def sys_close(self, caller: Caller, args: dict, emit: Emit) -> dict:
        return await self._settled(await (await self.k.procman.ask(m.Close(args["pid"], caller.user))))

    async def sys_models(self, caller: Caller, args: dict, emit: Emit) -> dict:
        return {"models": [{**d, "loaded": True} for d in await self.k.models.ask(m.ListModels())]}

    async def sys_model_load(self, caller: Caller, args: dict, emit: Emit) -> dict:
        model = args.pop("model")
        await self.may_use_model(caller, model)
        opts = {"device": args["device"], "instances": args["instances"], "kv_policy": args["kv_policy"],
                "num_blocks": args["kv_blocks"] + 1 if args["kv_blocks"] else None,
                "max_blocks": args["kv_max_blocks"] + 1 if args["kv_max_blocks"] else None,
                "user_cap_blocks": args["user_cap_blocks"], "max_batch": args["max_batch"],
                "keep_alive": args["keep_alive"], "engine": args["engine"], "spill_bytes": args["spill_bytes"],
                "spill_below_bytes": args["spill_below_bytes"], "backend": args["backend"],
                "num_cpus": args["num_cpus"], "num_gpus": args["num_gpus"], "placement": args["placement"],
                "dtype": args["dtype"], "prefix_cache": args["prefix_cache"]}
        await ready_executors(await self.k.models.ask(m.Load(model, opts)))
        return await self.k.models.ask(m.Describe(model))

    async def sys_model_unload(self, caller: Caller, args: dict, emit: Emit) -> dict:
        await self.may_use_model(caller, args["model"])  # resolving a path reads its config.json
        return await self.k.models.ask(m.Unload(args["model"], args["force"]))

    async def sys_model_info(self, caller: Caller, args: dict, emit: Emit) -> dict:
        await self.may_use_model(caller, args["model"])
        return await self.k.models.ask(m.Describe(args["model"]))

    async def sys_devices(self, caller: Caller, args: dict, emit: Emit) -> dict:
        return await self.k.models.ask(m.Devices())

    async def sys_metrics(self, caller: Caller, args: dict, emit: Emit) -> dict:
        return await self.metrics()

    async def metrics(self) -> dict:
        """The metrics syscall's reply: the process table's metrics and every model instance's."""
        procs = await self.k.procman.ask(m.Metrics())
        models = await self.k.models.ask(m.ListModels())
        return {**procs, "models": [ex for d in models for ex in d["executors"]]}

    async def sys_prometheus(self, caller: Caller, args: dict, emit: Emit) -> dict:
        return {"text": await self.k.exporter.text()}

    async def sys_score(self, caller: Caller, args: dict, emit: Emit) -> dict:
        if (args["text"] is None) == (args["prompt_ids"] is None):
            raise InvalidArgument("give exactly one of 'text' and 'prompt_ids'")
        await self.may_use_model(caller, args["model"])
        path, ready, token = await self.k.models.ask(m.Acquire(args["model"], None))
        try:  # held until the reply: a model in use is not unloaded under its score
            executors = await ready_executors(ready, any_ready=True)
            out = await (await executors[0].ask(wp.Score(0, args["text"], args["prompt_ids"],
                                                         args["add_special_tokens"])))
        finally:
            self.k.models.tell(m.Release(token))
        return {"model": path, "tokens": len(out["token_ids"]), **out}

    # -- users: the CURVE keys of tcp clients (kernel/identity.py) --------------------------------
    async def sys_user_add(self, caller: Caller, args: dict, emit: Emit) -> dict:
        if args["key"].encode() == self.k.public_key:
            raise InvalidArgument("that is the kernel's own public key, not a client's (a client's is the "
                                  "keys/client.key that `llmos keygen` made on the user's machine)")
        return self.k.keyring.add(args["user"], args["key"]).to_wire()

    async def sys_user_list(self, caller: Caller, args: dict, emit: Emit) -> dict:
        return {"keys": [e.to_wire() for e in self.k.keyring.entries()]}

    async def sys_user_remove(self, caller: Caller, args: dict, emit: Emit) -> dict:
        return {"user": args["user"], "removed": self.k.keyring.remove(args["user"], args["key"])}

    # -- the namespace (kernel/files.py) -------------------------------------------------------
    async def sys_fs_put(self, caller: Caller, args: dict, emit: Emit) -> dict:
        return await self.files.put(caller.user, caller.identity, args)

    async def sys_fs_get(self, caller: Caller, args: dict, emit: Emit) -> dict:
        return await self.files.get(caller.user, args, emit, self._backlog(caller))

    async def sys_fs_list(self, caller: Caller, args: dict, emit: Emit) -> dict:
        return await self.files.list(caller.user, args)

    async def sys_fs_remove(self, caller: Caller, args: dict, emit: Emit) -> dict:
        return await self.files.remove(caller.user, args)

    async def sys_fs_rename(self, caller: Caller, args: dict, emit: Emit) -> dict:
        return await self.files.rename(caller.user, args)

    async def sys_fs_stat(self, caller: Caller, args: dict, emit: Emit) -> dict:
        return await self.files.stat(caller.user, args)

    async def sys_dmesg(self, caller: Caller, args: dict, emit: Emit) -> dict:
        return await self.files.dmesg(args, emit, self._backlog(caller))

    def _backlog(self, caller: Caller) -> Callable[[], int]:
        """Bytes of replies the bus holds unsent for this caller (a big read waits while they pile up)."""
        def held() -> int:
            client = getattr(self.k, "bus", None) and self.k.bus.clients.get(caller.identity)
            return client.outbox.bytes if client else 0

        return held


async def ready_executors(ready: list[asyncio.Future], any_ready: bool = False) -> list:
    """The executors of a model once it is loaded. ``ready`` are the model's own futures, shared by every call
    waiting for the load: each is shielded, so a caller that goes away (its call cancelled) cancels only its
    own wait, never the load that the others wait for. ``any_ready``: the ones ready as soon as one is (a spawn
    need not wait for an instance still loading, or one Ray has yet to place again); the first error only when
    every one failed."""
    waits = [asyncio.shield(f) for f in ready]
    if not any_ready:
        return await asyncio.gather(*waits)
    pending, ok, error = set(waits), [], None
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for f in done:
            if f.exception() is None:
                ok.append(f.result())
            else:
                error = error or f.exception()
        if ok:
            for f in pending:
                f.cancel()  # the shields only: the loads go on
            return ok
    raise error


def handler_for(handlers: Handlers, name: str) -> Callable | None:
    return getattr(handlers, "sys_" + name, None)
