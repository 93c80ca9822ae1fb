"""The OpenAI request bodies the gateway takes (pydantic models), and their translation to spawn arguments.

Fields OpenAI clients send that LLMOS has no use for (``user``, ``metadata``, ``store``...) are accepted and
ignored; fields whose meaning LLMOS cannot honour (tools, penalties, logit bias, top-k alternatives) are
refused with a 400 that says so (:func:`refuse_unsupported`), never silently dropped. Every known field takes
its JSON type strictly, as OpenAI does: ``true`` is no integer (pydantic's lax mode read it as 1), ``"5"`` no
number; numbers are finite (NaN and Infinity are refused, not compared with a range).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from llmos.gateway.errors import invalid
from llmos.syscalls.table import PRIORITY_MAX, PRIORITY_MIN

MAX_N = 16  # most choices (processes) per prompt; a request's total is bounded by llmos serve --max-choices
ROLES = {"developer": "system"}  # OpenAI's role names that chat templates know by another
Role = Literal["system", "user", "assistant", "developer", "tool"]  # OpenAI's; another is a 400 (param messages.I.role)
MAX_STOP, MAX_STOP_CHARS = 16, 256  # the spawn syscall's bounds on stop (syscalls/table.py), checked here to name it
# strict: each field takes its JSON type only (no bool for an int, no string for a number); finite numbers only
STRICT = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)  # extra: fields of newer API versions, unused
OPENAI_TEMPERATURE, OPENAI_TOP_P = 1.0, 1.0  # OpenAI's defaults (the kernel's own are 0.8 and 0.95)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


TokenId = Annotated[int, Field(ge=0)]  # the top of the range is the model's vocabulary: the kernel checks it


class _Request(BaseModel):
    """The fields completions and chat share; extensions: ``priority``, ``session``, ``top_k``,
    ``repetition_penalty``, ``ignore_eos``."""

    model_config = STRICT

    model: str = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # LLMOS extensions
    priority: int = Field(0, ge=PRIORITY_MIN, le=PRIORITY_MAX)
    session: Union[bool, int, None] = None
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100.0)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        """At most 16 stop strings of 1..256 characters (an empty one would match at once: OpenAI refuses it)."""
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise PydanticCustomError("stop", f"stop has {len(stop)} items, at most {MAX_STOP}")
        for i, s in enumerate([stop] if isinstance(stop, str) else stop or []):
            where = "stop" if isinstance(stop, str) else f"stop[{i}]"
            if not s:
                raise PydanticCustomError("stop", f"{where} is empty: a stop string needs at least one character")
            if len(s) > MAX_STOP_CHARS:
                raise PydanticCustomError("stop", f"{where} has {len(s)} characters, at most {MAX_STOP_CHARS}")
        return stop

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def session_pid(self) -> int | None:
        """The session a request continues (``session: <pid>``), or None."""
        if self.session is None or isinstance(self.session, bool):
            return None
        if self.session < 1:
            raise invalid("session must be true (start a session) or the pid of one (a positive integer)",
                          "session")
        return self.session

    def opens_session(self) -> bool:
        return self.session is True


class CompletionRequest(_Request):
    """POST /v1/completions. ``prompt``: a string, a list of strings, token ids, or a list of token-id lists
    (each prompt gets ``n`` choices). ``logprobs``: 0 only (the chosen tokens' log-probabilities)."""

    prompt: Union[str, list[str], list[TokenId], list[list[TokenId]]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = STRICT
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = STRICT  # name, tool_call_id...: accepted, unused
    role: Role
    content: Union[str, list[TextPart], None] = None

    def text(self, i: int) -> str:
        """The content as one string: text parts joined; other parts (images, audio) are refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise invalid(f"messages[{i}]: content parts of type {part.type!r} are not supported (text only)",
                              f"messages.{i}.content")
            out.append(part.text)
        return "".join(out)


class ChatRequest(_Request):
    """POST /v1/chat/completions: ``messages`` go to spawn as they are (the kernel renders the model's chat
    template). ``logprobs``: the chosen tokens' log-probabilities; ``top_logprobs`` 0 only."""

    messages: list[Message] = Field(min_length=1, max_length=10_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def chat_messages(self) -> list[dict[str, str]]:
        """The messages as spawn takes them: [{role, content (text)}]; OpenAI's ``developer`` role (what newer
        clients send for the instructions) is the chat templates' ``system``. 400 for a non-text part."""
        return [{"role": ROLES.get(m.role, m.role), "content": m.text(i)} for i, m in enumerate(self.messages)]


# fields whose presence asks for something LLMOS does not do; a request carrying one is refused
UNSUPPORTED_CHAT = ("tools", "functions", "tool_choice", "function_call", "audio", "prediction", "modalities",
                    "web_search_options")


def refuse_unsupported(req: CompletionRequest | ChatRequest) -> None:
    """400 for what LLMOS cannot honour, each named; the documented list (docs/gateway.md) is this one."""
    if req.frequency_penalty or req.presence_penalty:
        raise invalid("frequency_penalty and presence_penalty are not supported (LLMOS has repetition_penalty, "
                      "an extension: a factor, 1 = off)", "frequency_penalty" if req.frequency_penalty
                      else "presence_penalty")
    if req.logit_bias:
        raise invalid("logit_bias is not supported", "logit_bias")
    if isinstance(req, CompletionRequest):
        if req.logprobs:
            raise invalid("logprobs > 0 (the most likely alternatives) is not supported: the kernel scores the "
                          "chosen tokens only; logprobs: 0 gives their log-probabilities", "logprobs")
        if req.echo:
            raise invalid("echo is not supported", "echo")
        if req.best_of not in (None, 1, req.n):
            raise invalid("best_of other than n is not supported", "best_of")
        if req.suffix:
            raise invalid("suffix (insertion) is not supported", "suffix")
    else:
        extra = req.model_extra or {}
        for name in UNSUPPORTED_CHAT:
            if extra.get(name):
                raise invalid(f"{name} is not supported by LLMOS", name)
        fmt = extra.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
            raise invalid("response_format other than text is not supported", "response_format")
        if req.top_logprobs:
            raise invalid("top_logprobs > 0 (the most likely alternatives) is not supported: the kernel scores "
                          "the chosen tokens only; logprobs: true gives their log-probabilities", "top_logprobs")
    if wants_logprobs(req) and req.stream:
        raise invalid("logprobs are computed once the whole output exists (the kernel's score syscall): ask for "
                      "them without stream", "logprobs")
    if req.session is not None and req.session is not False:
        if req.n != 1:
            raise invalid("a session has one reply per turn: n must be 1", "n")
        if wants_logprobs(req):
            raise invalid("logprobs are not supported in a session", "logprobs")
        if isinstance(req, CompletionRequest) and not isinstance(req.prompt, str):
            raise invalid("a session's turn is text: prompt must be a string", "prompt")


def wants_logprobs(req: CompletionRequest | ChatRequest) -> bool:
    """Whether the request asks for the chosen tokens' log-probabilities (completions: ``logprobs: 0``; chat:
    ``logprobs: true``); larger asks are refused by :func:`refuse_unsupported` first."""
    return req.logprobs is not None and req.logprobs is not False


def stop_list(stop: str | list[str] | None) -> list[str]:
    """OpenAI's ``stop`` (a string, a list, or none) as the kernel's list of stop strings ([] for none)."""
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def spawn_params(req: CompletionRequest | ChatRequest, default_max_tokens: int | None) -> dict[str, Any]:
    """The sampling arguments of spawn for a request (OpenAI's defaults: temperature 1, top_p 1; the output
    limit: max_completion_tokens, else max_tokens, else ``default_max_tokens``, else the kernel's)."""
    limit = getattr(req, "max_completion_tokens", None) or req.max_tokens or default_max_tokens
    params: dict[str, Any] = {
        "temperature": OPENAI_TEMPERATURE if req.temperature is None else req.temperature,
        "top_p": OPENAI_TOP_P if req.top_p is None else req.top_p,
        "max_new_tokens": limit, "seed": req.seed, "stop": stop_list(req.stop) or None,
        "top_k": req.top_k, "repetition_penalty": req.repetition_penalty,
        "ignore_eos": req.ignore_eos or None,
    }
    return {k: v for k, v in params.items() if v is not None}


def completion_prompts(req: CompletionRequest) -> list[dict[str, Any]]:
    """Each prompt of a completion request as spawn's input: {"prompt": text} or {"prompt_ids": ids}."""
    p = req.prompt
    if isinstance(p, str):
        return [{"prompt": p}]
    if not p:
        raise invalid("prompt is empty", "prompt")
    if all(isinstance(x, int) for x in p):
        return [{"prompt_ids": list(p)}]
    return [{"prompt": x} if isinstance(x, str) else {"prompt_ids": list(x)} for x in p]
