"""The synchronous client: one DEALER socket to the kernel, one method per syscall.

Not thread-safe: give each thread its own Client. Every wait on the socket has a finite
poll; while a call is pending and the kernel is silent, the client pings it, and a kernel
that answers nothing for DEAD_AFTER_S seconds raises KernelGone. A ping answered by another
kernel (pid or start time not hello's: killed and restarted on the same address) fails the
pending calls with KernelRestarted, after a new hello (so the user stays who it was);
``wait`` and ``stream`` then go on by themselves against the new kernel.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Iterator


from llmos._wire import (Calls, await_handshake, bus_context, check_ipc, current_user, model_arg, open_dealer,
                         spawn_args, syscall_doc)
from llmos.syscalls.address import resolve_address
from llmos.syscalls import protocol
from llmos.syscalls.errors import KernelGone, KernelRestarted, KernelUnavailable, LLMOSError, TimedOut
from llmos.types import ProcessInfo, ProcessResult, TurnResult

if TYPE_CHECKING:
    from llmos.store_data import DataSets
    from llmos.fs import FS, LogLines
    from llmos.session import Session


class Client:
    def __init__(self, address: str | None = None, *, connect_timeout: float = 5.0,
                 user: str | None = None, client_name: str = "llmos.Client", server_key: str | None = None,
                 client_key: str | None = None, insecure: bool | None = None, act_for: str | None = None) -> None:
        """Connect to the kernel at ``address`` (default: $LLMOS_ADDRESS, else the socket under $LLMOS_HOME)
        and say hello. Who this client is comes from the transport: over ipc this process's uid, over tcp
        its CURVE key (``client_key``: a .key_secret file, default $LLMOS_CLIENT_KEY or
        $LLMOS_HOME/keys/client.key_secret; ``server_key``: the kernel's public key file or Z85 text, default
        $LLMOS_SERVER_KEY or $LLMOS_HOME/keys/kernel.key; ``insecure``: plain tcp, for a kernel started with
        --insecure). ``user``: the user this client expects to be (NotPermitted, EPERM, when the transport
        says otherwise); ``self.user`` is who the kernel knows it as. ``act_for``: make every call for this user
        (it owns what is spawned, its quotas and permissions apply), when this client's own user may: the
        admin, or an account the admin named with ``llmos kernel start --delegate`` (a gateway); NotPermitted
        otherwise, at connect. ``self.user`` is then that user and ``self.kernel["by"]`` this client's own.

        Raises KernelUnavailable (no kernel answers), NotPermitted (the socket is closed to this user, or
        the kernel refused this key), ProtocolError (EPROTO: the tcp handshake failed: a wrong kernel key, or
        CURVE on one side only), InvalidArgument (a bad address, or tcp with no keys)."""
        self.address = resolve_address(address)  # InvalidArgument for an unusable one
        self.user = user or current_user()
        self._asked_user = user
        check_ipc(self.address)
        self._sock, monitor = open_dealer(bus_context(), self.address, server_key, client_key, insecure)
        if monitor is not None:
            await_handshake(self._sock, monitor, self.address, connect_timeout)
        self._calls = Calls(act_for)
        self._client_name = client_name
        self._pending: dict[int, int | None] = {}  # request id -> the pid it is about (None: no pid)
        self._restarted: set[int] = set()  # pending requests the kernel that knew them took down with it
        self.kernel: dict[str, Any] = {}
        try:
            self.kernel = self.hello(client=client_name, timeout=connect_timeout)
            self.user = self.kernel.get("user", self.user)
        except (TimedOut, KernelGone) as exc:
            self.close()
            raise KernelUnavailable(f"no kernel answers at {self.address}: {exc.message}") from None
        except BaseException:
            self.close()
            raise

    # -- transport -------------------------------------------------------------------------
    def call(self, name: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Make one syscall and return its result (raises the llmos error it answers with)."""
        args = args or {}
        rid = self._send(name, args)
        for kind, payload in self._frames(rid, timeout, _pid_of(args)):
            if kind == protocol.OK:
                return payload
        raise AssertionError("unreachable")

    def call_stream(self, name: str, args: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        """Yield ("chunk", data) frames, then ("ok", result)."""
        rid = self._send(name, args)
        yield from self._frames(rid, None, _pid_of(args))

    def _send(self, name: str, args: dict[str, Any]) -> int:
        if self._sock.closed:
            raise KernelGone("client is closed")
        rid, frame = self._calls.request(name, args)
        self._sock.send(frame)
        return rid

    def _frames(self, rid: int, timeout: float | None, pid: int | None = None) -> Iterator[tuple[str, Any]]:
        self._pending[rid] = pid
        try:
            yield from self._wait_frames(rid, timeout)
        finally:
            self._pending.pop(rid, None)
            self._restarted.discard(rid)

    def _wait_frames(self, rid: int, timeout: float | None) -> Iterator[tuple[str, Any]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        last_heard = time.monotonic()
        ping: int | None = None
        while True:
            if rid in self._restarted:  # noticed while another call of ours (a nested stream) was reading
                raise self._restart_error()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimedOut(f"no reply from the kernel within {timeout} s")
            wait = protocol.HEARTBEAT_S if deadline is None else min(protocol.HEARTBEAT_S, deadline - now)
            if not self._sock.poll(int(wait * 1000) + 1):
                silent = time.monotonic() - last_heard
                if silent > protocol.DEAD_AFTER_S:
                    raise KernelGone(f"kernel at {self.address} stopped answering")
                # a ping each heartbeat while silent: one sent into a dying kernel's buffer is lost with it
                ping = self._send("ping", {})
                continue
            got, kind, payload = self._calls.interpret(self._sock.recv())
            last_heard = time.monotonic()
            if got == ping and kind == protocol.OK and self._another_kernel(payload):
                self._rehello()
                raise self._restart_error()
            if got != rid:
                continue  # a ping reply, or a reply to a call abandoned earlier
            if kind == "err":
                raise payload
            yield kind, payload
            if kind == protocol.OK:
                return

    def _another_kernel(self, pong: dict[str, Any]) -> bool:
        """True when a ping's reply comes from another kernel than hello's (a kernel without these fields,
        an older one, is taken to be the same)."""
        if not isinstance(pong, dict) or "pid" not in pong or not self.kernel:
            return False
        return (pong.get("pid"), pong.get("started")) != (self.kernel.get("pid"), self.kernel.get("started"))

    def _rehello(self) -> None:
        """Say hello to the new kernel (so this connection's calls are the user's again, not anonymous), and
        mark every call pending on the old one as failed by the restart."""
        self._restarted.update(self._pending)
        self.kernel = self.hello(client=self._client_name, timeout=30.0)

    def _restart_error(self) -> KernelRestarted:
        pids = tuple(sorted({p for p in self._pending.values() if p is not None}))
        if pids:
            said = ", ".join(f"process {p} survives it: `llmos wait {p}`" for p in pids)
        else:
            said = "the call pending on the old kernel is lost with it"
        return KernelRestarted(f"the kernel at {self.address} restarted (pid {self.kernel.get('pid')}); {said}",
                               pids=pids)

    def close(self, pid: int | None = None) -> ProcessResult | None:
        """``close()``: disconnect from the kernel (what ``with Client() as c`` does on leaving; safe twice).

        ``close(pid)``: the ``close`` syscall: end a session (or any process, as TERM does) and return its
        ProcessResult; it is reaped. Raises NoSuchProcess (ESRCH), NotPermitted (EPERM: another user's),
        InvalidArgument (EINVAL).
        """
        if pid is not None:
            return ProcessResult.from_wire(self.call("close", {"pid": pid}, timeout=60.0))
        if not self._sock.closed:
            self._sock.close(linger=0)
        return None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- syscalls (one method per entry of llmos.syscalls.table) -----------------------------
    @syscall_doc("hello")
    def hello(self, client: str = "llmos.Client", timeout: float | None = 5.0) -> dict[str, Any]:
        """Sent by the constructor; returns {version, kernel_version, pid, max_frame_bytes}."""
        return self.call("hello", {"version": protocol.PROTOCOL_VERSION, "client": client, "user": self._asked_user},
                         timeout=timeout)

    @syscall_doc("ping")
    def ping(self, timeout: float | None = 5.0) -> dict[str, Any]:
        """Returns {time}: the kernel's unix time."""
        return self.call("ping", timeout=timeout)

    @syscall_doc("kernel_info")
    def kernel_info(self) -> dict[str, Any]:
        return self.call("kernel_info", timeout=30.0)

    @syscall_doc("shutdown")
    def shutdown(self) -> dict[str, Any]:
        return self.call("shutdown", timeout=30.0)

    @syscall_doc("spawn")
    def spawn(self, prompt: str | None = None, messages: list[dict] | None = None, model: str | None = None,
              priority: int = 0, *, session: bool = False, deadline: float | None = None,
              queue_timeout: float | None = None, **params: Any) -> int:
        """Returns the new pid. ``priority``: nice value -20..19 (below 0 only for root). ``session``: the
        process stays alive between turns (see ``write``, ``close`` and ``LLMOS.session``). ``deadline``
        and ``queue_timeout``: seconds (the process ends with ETIMEDOUT past them, partial output kept).
        ``params``: the sampling fields of the table (max_new_tokens, temperature, top_p, top_k, seed...), and
        ``capture`` (["attentions", "hidden_states"]), ``capture_layers``, ``capture_heads``: tensors stored for
        ``capture(pid, kind, layer)`` to read."""
        params.update(session=session, deadline=deadline, queue_timeout=queue_timeout)
        return self.call("spawn", spawn_args(prompt, messages, model, priority, params))["pid"]

    @syscall_doc("wait")
    def wait(self, pid: int, timeout: float | None = None, reap: bool = True) -> ProcessResult:
        """``timeout`` in seconds (None waits forever); TimedOut when it passes. A kernel restarted meanwhile
        (KernelRestarted) is waited on again for the same pid, within what is left of ``timeout``: waiting is
        idempotent, and the process survives the restart."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                # the kernel answers by ``left``; past it with a margin, a kernel that still answers pings but
                # not this call is stalled: TimedOut, not a wait forever
                return ProcessResult.from_wire(self.call("wait", {"pid": pid, "timeout": left, "reap": reap},
                                                         timeout=None if left is None else left + 30.0))
            except KernelRestarted:
                continue

    @syscall_doc("kill")
    def kill(self, pid: int, signal: str = "TERM") -> str:
        """``signal``: TERM, KILL, STOP or CONT. Returns the process's state after delivery."""
        return self.call("kill", {"pid": pid, "signal": signal}, timeout=30.0)["state"]

    def stop(self, pid: int) -> str:
        """``kill(pid, "STOP")``: suspend a process (it leaves the batch, its KV swapped out); returns its state
        (STOPPED, or ZOMBIE if it had already ended). Raises NoSuchProcess, NotPermitted."""
        return self.kill(pid, "STOP")

    def cont(self, pid: int) -> str:
        """``kill(pid, "CONT")``: resume a STOPPED process exactly where it was; returns its state.
        Raises NoSuchProcess, NotPermitted."""
        return self.kill(pid, "CONT")

    @syscall_doc("nice")
    def nice(self, pid: int, priority: int) -> dict[str, Any]:
        """``priority``: the new nice value, -20..19. Returns {pid, priority, state}."""
        return self.call("nice", {"pid": pid, "priority": priority}, timeout=30.0)

    @syscall_doc("ps")
    def ps(self) -> list[ProcessInfo]:
        return [ProcessInfo.from_wire(p) for p in self.call("ps", timeout=30.0)["processes"]]

    @syscall_doc("stat")
    def stat(self, pid: int) -> ProcessInfo:
        return ProcessInfo.from_wire(self.call("stat", {"pid": pid}, timeout=30.0))

    @syscall_doc("stream")
    def stream(self, pid: int) -> "OutputStream":
        """Iterate the returned OutputStream for text chunks; its ``result`` is the ProcessResult at the end.
        A kernel restarted meanwhile (KernelRestarted) is streamed from again for the same pid, skipping the
        text and token ids already yielded (a new stream's first chunk holds everything so far)."""
        return OutputStream(self._restreamed(pid))

    def _restreamed(self, pid: int) -> Iterator[tuple[str, Any]]:
        given_text, given_ids = 0, 0  # what the caller has had, in characters and token ids
        while True:
            skip_text, skip_ids = given_text, given_ids
            try:
                for kind, payload in self.call_stream("stream", {"pid": pid}):
                    if kind == protocol.OK:
                        yield kind, payload
                        return
                    text, ids = payload.get("text") or "", payload.get("token_ids") or []
                    cut_text, cut_ids = min(skip_text, len(text)), min(skip_ids, len(ids))
                    skip_text, skip_ids = skip_text - cut_text, skip_ids - cut_ids
                    payload = {**payload, "text": text[cut_text:], "token_ids": ids[cut_ids:]}
                    given_text += len(payload["text"])
                    given_ids += len(payload["token_ids"])
                    yield kind, payload
            except KernelRestarted:
                continue

    @syscall_doc("write")
    def write(self, pid: int, content: str, role: str = "user") -> TurnResult:
        """Waits for the whole reply and returns the TurnResult (``stats.prefill_tokens``: what the turn
        computed). A turn that ended in an error (ETIMEDOUT past its deadline...) comes back with
        finish_reason "error" and its ``error``; ``Session.send`` raises it instead."""
        turn = self.write_stream(pid, content, role)
        for _ in turn:
            pass
        assert turn.result is not None, "a write stream ends with the turn's result"
        return turn.result

    def write_stream(self, pid: int, content: str, role: str = "user") -> "TurnStream":
        """The ``write`` syscall, streamed: iterate the returned TurnStream for the reply's text chunks; its
        ``result`` is the TurnResult once the turn ends. Raises as ``write``."""
        return TurnStream(self.call_stream("write", {"pid": pid, "content": content, "role": role}))

    def session(self, model: str | None = None, system: str | None = None, **sampling: Any) -> "Session":
        """Start a session process (``spawn(session=True)``) and return it as a context manager:
        ``with c.session(system="Be brief.", temperature=0) as s: s.send("hi")``. Raises as ``spawn``."""
        from llmos.session import Session

        return Session(self, model, system, **sampling)

    @syscall_doc("models")
    def models(self) -> list[dict[str, Any]]:
        return self.call("models", timeout=30.0)["models"]

    @syscall_doc("model_load")
    def model_load(self, model: str | None = None, **options: Any) -> dict[str, Any]:
        return self.call("model_load", {"model": model_arg(model), **options}, timeout=600.0)

    @syscall_doc("model_unload")
    def model_unload(self, model: str | None = None, force: bool = False) -> dict[str, Any]:
        return self.call("model_unload", {"model": model_arg(model), "force": force}, timeout=60.0)

    @syscall_doc("model_info")
    def model_info(self, model: str | None = None) -> dict[str, Any]:
        return self.call("model_info", {"model": model_arg(model)}, timeout=30.0)

    @syscall_doc("devices")
    def devices(self) -> list[dict[str, Any]]:
        return self.call("devices", timeout=30.0)["devices"]

    @syscall_doc("metrics")
    def metrics(self) -> dict[str, Any]:
        return self.call("metrics", timeout=30.0)

    @syscall_doc("prometheus")
    def prometheus(self) -> str:
        """Returns the exposition text (parse it with prometheus_client.parser.text_string_to_metric_families)."""
        return (self.call("prometheus", timeout=30.0))["text"]

    @syscall_doc("score")
    def score(self, text: str | None = None, model: str | None = None, *, prompt_ids: list[int] | None = None,
              add_special_tokens: bool = True, timeout: float | None = None) -> dict[str, Any]:
        """Returns {model, tokens, token_ids, logprobs (natural log, one per token after the first), nll (nats),
        windows, stride}. ``timeout``: seconds (None waits; a long text takes a forward pass per half context)."""
        return self.call("score", {"model": model_arg(model), "text": text, "prompt_ids": prompt_ids,
                                   "add_special_tokens": add_special_tokens}, timeout=timeout)

    # -- users (the admin's): CURVE keys of tcp clients ------------------------------------------
    @syscall_doc("user_add")
    def user_add(self, user: str, key: str) -> dict[str, Any]:
        """``key``: a public key file (as `llmos keygen` writes) or its 40 Z85 characters. Returns {user, key,
        fingerprint, added (unix time)}."""
        from llmos.syscalls.keys import read_public_key

        return self.call("user_add", {"user": user, "key": read_public_key(key).decode("ascii")})

    @syscall_doc("user_list")
    def user_list(self) -> list[dict[str, Any]]:
        """One {user, key, fingerprint, added} per authorised key."""
        return self.call("user_list")["keys"]

    @syscall_doc("user_remove")
    def user_remove(self, user: str, key: str | None = None) -> int:
        """``key``: one key (Z85 or fingerprint); None withdraws all of the user's. Returns how many were."""
        return self.call("user_remove", {"user": user, "key": key})["removed"]

    @property
    def data(self) -> "DataSets":
        """The data sets in the store (/data): ``import_file``, ``records``, ``ls``, ``stat``, ``rm``
        (llmos.store_data.DataSets)."""
        from llmos.store_data import DataSets

        return DataSets(self)

    # -- the namespace (``fs`` wraps these in friendlier calls) --------------------------------
    @property
    def fs(self) -> "FS":
        """The namespace: ``c.fs.put(path, data)``, ``get``, ``open``, ``ls``, ``stat``, ``rm``, ``exists``
        (llmos.fs.FS; paths under /models, /data, /proc, /home/<user>, /var/log)."""
        from llmos.fs import FS

        return FS(self)

    @syscall_doc("fs_put")
    def fs_put(self, path: str, data: bytes | bytearray | memoryview = b"", upload: int | None = None,
               new_extent: bool = False, last: bool = True) -> dict[str, Any]:
        """One frame of a write: ``data`` at most 8 MiB (``fs.put`` streams any size). Returns {upload} while
        ``last`` is false, else the file's stat as a map (path, kind, size, owner, mtime, extents; upload null)."""
        return self.call("fs_put", {"path": path, "data": data, "upload": upload, "new_extent": new_extent,
                                    "last": last}, timeout=120.0)

    def capture(self, pid: int, kind: str, layer: int) -> Any:
        """The tensor a process captured (``spawn(capture=[...])``), as a numpy float32 array:
        ``kind`` "hidden_states": [tokens, hidden] for ``layer`` 0..L (0: the embeddings' output; l: block l's
        output; L: the last block's after the final norm, as transformers' output_hidden_states);
        ``kind`` "attentions": [tokens, heads, tokens] for ``layer`` 0..L-1, row t the softmax weights of
        position t over positions 0..t, zero beyond (heads as chosen by capture_heads).
        tokens: every position processed, the prompt's then each generated token's but the last. The capture
        is stored before the process's result is returned, and outlives the process (``wait`` reaps it). Read
        from /proc/<pid>/capture/<kind>/<layer>.npy (its index.json lists what was kept, and why not more).
        Raises NotFound (ENOENT: not captured, that layer not kept, or removed), NotPermitted (EPERM: another
        user's process), InvalidArgument (EINVAL: an unknown kind or a bad layer)."""
        from llmos.capture import read_capture

        return read_capture(self.fs_get, pid, kind, layer)

    @syscall_doc("fs_get")
    def fs_get(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """Returns the range's bytes (``length`` None: to the end of the file)."""
        return b"".join(self.fs_get_pieces(path, offset, length)[1])

    def fs_get_pieces(self, path: str, offset: int = 0, length: int | None = None) -> tuple[dict[str, Any], list[bytes]]:
        """The ``fs_get`` syscall as it arrives: (its reply {path, size, mtime, offset, length, data}, the range's
        pieces in order: each chunk's data, then the reply's). Raises as ``fs_get``."""
        pieces: list[bytes] = []
        for kind, payload in self.call_stream("fs_get", {"path": path, "offset": offset, "length": length}):
            pieces.append(payload["data"])
            if kind == protocol.OK:
                return payload, pieces
        raise AssertionError("a stream ends with its final frame")

    @syscall_doc("fs_list")
    def fs_list(self, path: str = "/", limit: int = 1000) -> dict[str, Any]:
        """Returns {path, entries (stat maps), truncated}."""
        return self.call("fs_list", {"path": path, "limit": limit}, timeout=60.0)

    @syscall_doc("fs_remove")
    def fs_remove(self, path: str, recursive: bool = False) -> dict[str, Any]:
        """Returns {path, removed: files removed}."""
        return self.call("fs_remove", {"path": path, "recursive": recursive}, timeout=120.0)

    @syscall_doc("fs_rename")
    def fs_rename(self, src: str, dst: str, replace: bool = False) -> dict[str, Any]:
        """Returns {src, dst, moved: files moved}."""
        return self.call("fs_rename", {"src": src, "dst": dst, "replace": replace}, timeout=120.0)

    @syscall_doc("fs_stat")
    def fs_stat(self, path: str) -> dict[str, Any]:
        """Returns {path, kind, size, owner, mtime, extents}."""
        return self.call("fs_stat", {"path": path}, timeout=30.0)

    @syscall_doc("dmesg")
    def dmesg(self, n: int = 100, since: int | None = None, follow: bool = False) -> "LogLines":
        """Iterate the returned LogLines for the lines (JSON strings, oldest first); its ``seq`` is the newest
        line's seq at the end. With ``follow`` the iteration goes on with each new line (close it to stop)."""
        from llmos.fs import LogLines

        return LogLines(self.call_stream("dmesg", {"n": n, "since": since, "follow": follow}))


def _pid_of(args: dict[str, Any]) -> int | None:
    """The process a call is about (for KernelRestarted's message), if it names one."""
    pid = args.get("pid")
    return pid if isinstance(pid, int) and not isinstance(pid, bool) else None


class OutputStream:
    """Iterate to get text chunks as they are generated; ``result`` is set once it ends."""

    result_type: Any = ProcessResult

    def __init__(self, frames: Iterator[tuple[str, Any]]) -> None:
        self._frames = frames
        self.result: Any = None
        self.token_ids: list[int] = []

    def __iter__(self) -> Iterator[str]:
        for kind, payload in self._frames:
            if kind == protocol.OK:
                self.result = self.result_type.from_wire(payload)
                return
            self.token_ids.extend(payload.get("token_ids", []))
            if payload.get("text"):
                yield payload["text"]

    def close(self) -> None:
        close = getattr(self._frames, "close", None)
        if close:
            close()


class TurnStream(OutputStream):
    """A session turn's reply: iterate for text chunks; ``result`` is the TurnResult once it ends."""

    result_type = TurnResult


__all__ = ["Client", "OutputStream", "TurnStream", "LLMOSError"]
