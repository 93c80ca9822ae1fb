"""The gateway's FastAPI application: OpenAI's routes over the kernel's syscalls, /health and /metrics.

``create_app(GatewayConfig(...))`` builds it; ``llmos serve`` runs it with uvicorn. Every error reaches the
HTTP client in OpenAI's shape (llmos.gateway.errors), never as a traceback. A client that goes away ends
its processes: a stream's with the stream, a non-streamed request's as soon as the server notices the
connection closed (it watches for the disconnect while the processes run).
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmos.gateway import errors
from llmos.aclient import AsyncClient
from llmos.gateway.apikeys import KeyRing, KeysUnreadable
from llmos.gateway.errors import HTTPError, invalid
from llmos.gateway.link import KernelLink
from llmos.gateway.metrics import CLIENT_CLOSED, GatewayMetrics, MetricsMiddleware, without_process_families
from llmos.gateway.responses import DONE, Shape, sse
from llmos.gateway.runs import Failed, Outcome, Run
from llmos.gateway.schema import (ChatRequest, CompletionRequest, completion_prompts, refuse_unsupported,
                                  spawn_params, wants_logprobs)
from llmos.gateway.sessions import SessionOwners
from llmos.syscalls.errors import Errno, KernelGone, LLMOSError

log = logging.getLogger("llmos.gateway")
SESSION_HEADER = "x-llmos-session"  # a session's pid, on every response of a session's turn (streamed too)


ANONYMOUS = "anonymous"  # whom keyless requests act for when the gateway's own user is the kernel's admin
DEFAULT_MAX_CHOICES = 64  # llmos.cli_serve copies it (its --help must not import FastAPI): a test keeps them equal
DEFAULT_MODEL = "default"  # the kernel's shipped model: every request may name it, loaded or not
STORE_MODELS, STORE_PREFIX = "/models", "store:"  # the store's models: store:/models/NAME


def model_names(model_id: str) -> list[str]:
    """The ids GET /v1/models may list ``model_id`` under, as the kernel resolves a request's model: itself; a
    store model's ``NAME`` and ``/models/NAME`` as ``store:/models/NAME``; a path as written or normalised
    (``/a/b/`` is ``/a/b``)."""
    names = [model_id]
    if model_id.startswith(STORE_MODELS + "/"):
        names.append(STORE_PREFIX + model_id)
    elif "/" not in model_id and ":" not in model_id:
        names.append(f"{STORE_PREFIX}{STORE_MODELS}/{model_id}")
    if model_id.startswith("/"):
        names.append(posixpath.normpath(model_id))
    return names


@dataclass
class GatewayConfig:
    """``address``: the kernel's bus address (None: the default). ``keys_file``: the API keys (see
    llmos.gateway.apikeys). ``default_max_tokens``: the output limit of a request that gives none (None:
    the kernel's default, 128). ``require_keys``: every request needs an API key even when the file holds
    none (decided at start: keys existed then, or the host is not loopback; a gateway that started keyless
    requires them from the moment one is added). ``max_choices``: most processes one request may start
    (prompts x n)."""

    address: str | None
    keys_file: Path
    default_max_tokens: int | None = None
    require_keys: bool = False
    max_choices: int = DEFAULT_MAX_CHOICES


class EventStream(StreamingResponse):
    """A server-sent event stream whose generator is always closed when the response ends, the client gone
    or not: its ``finally`` ends the run's processes."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[union-attr]


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body was read already: the next message is
    the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Gateway:
    """The state of a running gateway: its kernel connections, its keys, the sessions it opened, its metrics,
    and the tasks that end the processes of clients that went away."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.link = KernelLink(config.address)
        self.keys = KeyRing(config.keys_file)
        self.sessions = SessionOwners()
        self.metrics = GatewayMetrics()
        self.enders: set[asyncio.Task] = set()
        self._keys_required = config.require_keys  # once true, never false again (removing keys never opens up)
        self._said_who = False

    # -- who is asking ---------------------------------------------------------------------------
    def caller(self, request: Request) -> str | None:
        """The user a request acts for: its API key's, or None (keyless: see :meth:`client_for`) when keys are
        not required. 401 for a missing or unknown key, and for every request when keys are required and
        none is left; 503 when the keys file cannot be read (fails closed; its log says why)."""
        try:
            configured = self.keys.configured()
            if configured:
                self._keys_required = True
            if not self._keys_required:
                return None
            auth = request.headers.get("authorization", "")
            scheme, _, key = auth.partition(" ")
            if not configured:
                raise HTTPError(401, "this gateway requires an API key and none is configured (the admin makes one "
                                "with `llmos api-key add USER`)", "invalid_request_error", None, "invalid_api_key")
            if scheme.lower() != "bearer" or not key.strip():
                raise HTTPError(401, "no API key: send it as 'Authorization: Bearer KEY' (the admin makes one "
                                "with `llmos api-key add USER`)", "invalid_request_error", None, "invalid_api_key")
            user = self.keys.user_of(key.strip())
        except KeysUnreadable:
            raise HTTPError(503, "the gateway's API keys cannot be read; its log says why", "server_error", None,
                            "EIO") from None
        if user is None:
            raise HTTPError(401, "unknown API key", "invalid_request_error", None, "invalid_api_key")
        return user

    async def client_for(self, user: str | None) -> AsyncClient:
        """The kernel connection a request of ``user`` (an API key's user; None: keyless) makes its calls on.
        Keyless, the gateway's own identity, except when that is the kernel's admin: then the calls act for
        ANONYMOUS, a user with no rights of its own (a loopback port must not hand the admin's rights to
        every local user). 503 (or the errno's status) when no kernel answers."""
        try:
            if user is None:
                own = await self.link.client(None)
                user = self._keyless_user(own)
            return await self.link.client(user)
        except LLMOSError as exc:
            raise errors.from_llmos(exc) from None

    def _keyless_user(self, own: AsyncClient) -> str | None:
        admin = bool(own.kernel.get("admin"))
        if not self._said_who and not self._keys_required:
            self._said_who = True
            print(f"llmos serve: no API keys: requests act for {ANONYMOUS!r} (the gateway's user {own.user} is the "
                  f"kernel's admin)" if admin else f"llmos serve: no API keys: every request acts as {own.user}, "
                  f"the gateway's user", file=sys.stderr, flush=True)
        return ANONYMOUS if admin else None

    async def say_who(self) -> None:
        """At start: say whom keyless requests act for, when the kernel answers already (else the first
        request says it)."""
        if self._keys_required:
            return
        try:
            self._keyless_user(await self.link.client(None))
        except LLMOSError:
            pass

    @asynccontextmanager
    async def kernel(self, user: str | None, own: bool = False) -> AsyncIterator[AsyncClient]:
        """``async with gw.kernel(user) as client``: the connection of ``user`` (as client_for; ``own``: the
        gateway's own instead, whoever asks); a call on it that finds the kernel gone (KernelGone,
        KernelRestarted) drops the connection (the next request connects afresh), then the error goes on
        (503). HTTPError when no kernel answers."""
        if own:
            try:
                client = await self.link.client(None)
            except LLMOSError as exc:
                raise errors.from_llmos(exc) from None
        else:
            client = await self.client_for(user)
        try:
            yield client
        except LLMOSError as exc:
            self.link.drop_if_gone(client, exc)
            raise

    def end_later(self, run: Run) -> asyncio.Task:
        """End a run's processes in a task of its own: it completes even when the request's task is being
        cancelled (the client went away)."""
        return self._track(self._end(run))

    def _track(self, work: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(work)
        self.enders.add(task)  # close() waits for it; a reference kept, so it is never collected unfinished
        task.add_done_callback(self.enders.discard)
        return task

    async def _end(self, run: Run) -> None:
        """End what is left of ``run`` once, logging a failure; a session it ended is forgotten."""
        try:
            await run.end()
        except LLMOSError as exc:
            log.warning("could not end the processes %s of a request: %s", sorted(run.live), exc)
        if run.session is not None and run.session_over:
            self.sessions.ended(run.session)

    # -- generation --------------------------------------------------------------------------------
    async def generate(self, request: Request, req: CompletionRequest | ChatRequest, user: str | None) -> Response:
        """Answer a completions or chat request of ``user`` (an API key's user; None: keyless): its processes
        spawned (or a session's turn sent), then a JSON body, or an event stream when ``stream`` is set. A
        session's pid is in every body and chunk (``session``) and in the ``x-llmos-session`` header.
        Raises HTTPError: 400 for what the gateway refuses (more than ``max_choices`` processes, unsupported
        fields), 404 for an unknown model or a session this caller did not open here, or the status of the
        kernel's errno (errors.STATUS)."""
        chat = isinstance(req, ChatRequest)
        refuse_unsupported(req)
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        started = time.monotonic()
        client = await self.client_for(user)
        run = Run(client, req.model, lambda: self.metrics.ttft.labels(endpoint).observe(time.monotonic() - started))
        run.want_logprobs = wants_logprobs(req)
        try:
            await self._start(run, req, user)
        except LLMOSError as exc:
            self.link.drop_if_gone(client, exc)
            raise errors.from_llmos(exc, "session" if req.session_pid() and exc.errno is Errno.ESRCH else None)
        shape = Shape(chat, req.model, req.include_usage(), run.session)
        headers = {} if run.session is None else {SESSION_HEADER: str(run.session)}
        if req.stream:
            return EventStream(self._events(run, shape, req.n), headers={"Cache-Control": "no-cache", **headers})
        return await self._until_disconnect(request, self._collect(run, shape, req.n, headers), run)

    async def _start(self, run: Run, req: CompletionRequest | ChatRequest, user: str | None) -> None:
        params = spawn_params(req, self.config.default_max_tokens)
        messages = req.chat_messages() if isinstance(req, ChatRequest) else None
        pid = req.session_pid()
        if pid is None and not req.opens_session():
            inputs = [{"messages": messages}] if messages is not None else completion_prompts(req)
            if len(inputs) * req.n > self.config.max_choices:
                raise invalid(f"{len(inputs)} prompts x n={req.n} asks for {len(inputs) * req.n} choices; this "
                              f"gateway starts at most {self.config.max_choices} per request (llmos serve "
                              f"--max-choices)", "n")
            await run.spawn(inputs, req.n, params, req.priority)
            return
        if messages is not None:
            content, role, before = messages[-1]["content"], messages[-1]["role"], messages[:-1]
        else:
            assert isinstance(req.prompt, str)  # refuse_unsupported: a session's turn is text
            content, role, before = req.prompt, "user", []
        if pid is None:
            await run.open_session(before, params, req.priority)
            pid = run.session
            assert pid is not None
            self.sessions.opened(pid, user)
        else:
            self.sessions.check(pid, user)
        run.turn(pid, content, role)

    def _failure(self, run: Run, exc: Failed) -> HTTPError:
        self.link.drop_if_gone(run.client, exc.error)
        unknown_session = run.session is not None and exc.error.errno is Errno.ESRCH
        if unknown_session:
            self.sessions.ended(run.session)  # type: ignore[arg-type]
        return errors.from_llmos(exc.error, "session" if unknown_session else None)

    async def _collect(self, run: Run, shape: Shape, n: int, headers: dict[str, str]) -> Response:
        try:
            async for _ in run.deltas():
                pass
            outcomes = [o for o in run.outcomes if o is not None]
            for o in outcomes:
                failed = errors.of_outcome(o.finish_reason, o.error)
                if failed is not None:
                    raise failed
            if run.want_logprobs:
                await run.add_logprobs()
        except Failed as exc:
            raise self._failure(run, exc) from None
        except LLMOSError as exc:
            self.link.drop_if_gone(run.client, exc)
            raise errors.from_llmos(exc) from None
        finally:
            await self._end(run)  # the one end of a non-streamed run: done, failed or cancelled
        return JSONResponse(shape.response(outcomes, n), headers=headers)

    async def _until_disconnect(self, request: Request, work: Awaitable[Response], run: Run) -> Response:
        """Run ``work`` unless the client goes away first: then it is cancelled, and its own ``finally`` ends
        the run's processes (TERM, reaped) once; that ending is awaited shielded and tracked, so it completes
        (and shutdown waits for it) even when this request's task is cancelled too."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            self._track(asyncio.gather(task, return_exceptions=True))
            raise
        finally:
            gone.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.shield(self._track(asyncio.gather(task, return_exceptions=True)))
        return Response(status_code=CLIENT_CLOSED)

    async def _events(self, run: Run, shape: Shape, n: int) -> AsyncIterator[str]:
        try:
            async for item in run.deltas():
                if isinstance(item, Outcome):
                    failed = errors.of_outcome(item.finish_reason, item.error)
                    if failed is not None:
                        yield sse(failed.body())
                        break
                    yield sse(shape.finish(item))
                elif item.text:
                    yield sse(shape.delta(item.index, item.text))
            else:
                if shape.include_usage:
                    yield sse(shape.usage_chunk([o for o in run.outcomes if o is not None], n))
        except Failed as exc:
            yield sse(self._failure(run, exc).body())
        finally:
            ender = self.end_later(run)
            with anyio.CancelScope(shield=True):
                await ender
        yield DONE

    async def close(self) -> None:
        """On stop: wait (at most 30 s) for the processes of ended requests to be ended and reaped, then close
        every kernel connection."""
        if self.enders:
            await asyncio.wait(list(self.enders), timeout=30.0)
        await self.link.close()


def create_app(config: GatewayConfig) -> FastAPI:
    """The gateway as an ASGI application (see the module's docstring)."""
    gw = Gateway(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.say_who()
        yield
        await gw.close()

    app = FastAPI(title="LLMOS gateway", version="1", lifespan=lifespan)
    app.state.gateway = gw
    app.add_middleware(MetricsMiddleware, metrics=gw.metrics)

    def error_response(e: HTTPError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPError)
    async def on_http_error(request: Request, exc: HTTPError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(errors.validation(list(exc.errors())))

    @app.exception_handler(LLMOSError)
    async def on_llmos(request: Request, exc: LLMOSError) -> JSONResponse:
        return error_response(errors.from_llmos(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_starlette(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(HTTPError(exc.status_code, str(exc.detail), kind))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error answering %s %s", request.method, request.url.path)
        return error_response(HTTPError(500, f"internal error in the gateway ({type(exc).__name__}); its log has "
                                        f"the details", "server_error", None, "internal_error"))

    caller: Callable[[Request], str | None] = gw.caller

    @app.get("/health")
    async def health() -> Response:
        try:
            ping = await gw.link.reachable()
        except LLMOSError as exc:
            return error_response(HTTPError(503, exc.message, "server_error", None, exc.errno.name))
        return JSONResponse({"status": "ok", "kernel": {"pid": ping.get("pid"), "started": ping.get("started")}})

    @app.get("/metrics")
    async def metrics() -> Response:
        text = gw.metrics.text()
        try:
            async with gw.kernel(None, own=True) as client:
                text += without_process_families(await client.prometheus())
        except (HTTPError, LLMOSError) as exc:
            log.warning("the kernel's metrics are not available: %s", exc)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def model_ids(user: str | None) -> list[str]:
        """``default`` (always runnable: the kernel loads it on first use), the loaded models as the kernel
        names them (a directory's path, ``store:/models/NAME``), then the store's (loaded on first use)."""
        ids: dict[str, None] = {DEFAULT_MODEL: None}
        async with gw.kernel(user) as client:
            for m in await client.models():
                ids[m["model"]] = None
            try:  # a kernel without a store has none
                listing = await client.fs_list(STORE_MODELS, limit=10_000)
            except KernelGone:
                raise
            except LLMOSError:
                listing = {"entries": []}
        for e in listing["entries"]:
            if e.get("kind") == "dir" and not e["path"].rsplit("/", 1)[-1].startswith("."):  # "." : an import's staging
                ids.setdefault(STORE_PREFIX + e["path"], None)
        return list(ids)

    def model_object(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "llmos"}

    @app.get("/v1/models")
    async def list_models(user: str | None = Depends(caller)) -> dict[str, Any]:
        return {"object": "list", "data": [model_object(i) for i in await model_ids(user)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, user: str | None = Depends(caller)) -> dict[str, Any]:
        """The model by any name a request takes for it (its ``id`` is the name asked for): ``default``, a
        loaded path, and a store model as ``NAME``, ``/models/NAME`` or ``store:/models/NAME``."""
        ids = set(await model_ids(user))
        if any(name in ids for name in model_names(model_id)):
            return model_object(model_id)
        raise HTTPError(404, f"no model {model_id!r}: not 'default', not loaded, and not in the store (GET "
                        f"/v1/models lists them)", "invalid_request_error", "model", "model_not_found")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, user: str | None = Depends(caller)) -> Response:
        return await gw.generate(request, body, user)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request, user: str | None = Depends(caller)) -> Response:
        return await gw.generate(request, body, user)

    @app.delete("/v1/sessions/{pid}")
    async def close_session(pid: int, user: str | None = Depends(caller)) -> dict[str, Any]:
        gw.sessions.check(pid, user)
        try:
            async with gw.kernel(user) as client:
                result = await client.close(pid)
        except LLMOSError as exc:
            if exc.errno is Errno.ESRCH:
                gw.sessions.ended(pid)
            raise errors.from_llmos(exc, "session") from None
        gw.sessions.ended(pid)
        return {"id": pid, "object": "session", "deleted": True,
                "llmos_finish_reason": result.finish_reason if result else None}

    return app
