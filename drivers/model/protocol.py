"""The kernel <-> model worker protocol, defined once: the ops, the events, the error struct, the KV constants.

The kernel (``kernel/executor.py``) and the worker (``drivers/model/worker.py``) both import
this module and nothing else defines a frame between them. Every message is plain data (ids,
numbers, strings, lists, maps), so it can cross a process boundary, a ZeroMQ socket or a Ray
actor call unchanged; never a future, a queue or an actor. On the wire each message is a
MessagePack map with an ``op`` field (``to_wire``/``from_wire``); this module imports no torch.

The division of labour follows nano-vllm's ``scheduler.py`` and vLLM v1's ``SchedulerOutput``:
the kernel's scheduler (``kernel/scheduler.py``) decides which sequences are in the batch
(``Add``, ``Resume``, ``Preempt``); the engine fills each step's token budget with them, and any
preemption it must make itself under memory pressure comes back as a ``StepEvent`` with
``preempted`` set, so the kernel's process table always says where each process is.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

# -- KV cache constants -----------------------------------------------------------------------------------------
BLOCK_SIZE = 8  # token slots per KV block, the default of every engine and of the kernel's accounting
PAD_BLOCK = 0  # the block kept zeroed that pads block tables; never allocated to a sequence

PREEMPT_MODES = ("swap", "recompute")  # swap: KV blocks copied to the worker's host swap area; recompute: dropped


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """KV blocks that hold ``tokens`` slots."""
    return -(-tokens // block_size)


# -- the error struct -------------------------------------------------------------------------------------------
def error_struct(errno: int, name: str, message: str) -> dict[str, Any]:
    """The one error shape on every wire: ``{errno, error, message}`` (see ``syscalls.errors.wire_error``)."""
    return {"errno": int(errno), "error": name, "message": message}


# -- messages ---------------------------------------------------------------------------------------------------
_OPS: dict[str, type] = {}


class _Message:
    """A frame between kernel and worker: a dataclass with a class-level ``op`` name."""

    op: ClassVar[str]

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        _OPS[cls.op] = cls

    def to_wire(self) -> dict[str, Any]:
        out = {"op": self.op}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, list) and value and hasattr(value[0], "to_wire"):
                value = [v.to_wire() for v in value]
            out[f.name] = value
        return out


def from_wire(msg: dict[str, Any]) -> Any:
    """The message a decoded frame (a map with ``op``) stands for; ValueError for an unknown op or bad fields."""
    if not isinstance(msg, dict):
        raise ValueError(f"a worker protocol frame is a map, got {type(msg).__name__}")
    cls = _OPS.get(msg.get("op"))  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown worker protocol op {msg.get('op')!r}")
    kw = {f.name: msg[f.name] for f in fields(cls) if f.name in msg}
    if cls is Step:
        kw["events"] = [StepEvent.from_wire(e) for e in kw.get("events") or []]
    try:
        return cls(**kw)
    except TypeError as exc:
        raise ValueError(f"bad '{msg.get('op')}' frame: {exc}") from None


# kernel -> worker ---------------------------------------------------------------------------------------------
@dataclass
class Encode(_Message):
    """Tokenise a prompt, render chat messages, or check token ids; answered by ``Encoded`` with the same rid."""

    op: ClassVar[str] = "encode"
    rid: int
    prompt: str | None = None
    messages: list[dict] | None = None
    prompt_ids: list[int] | None = None
    add_special_tokens: bool = True  # False: a continuation's text (a session's next turn), no BOS


@dataclass
class Score(_Message):
    """Log-probabilities of a text's tokens under the model (perplexity); answered by ``Scored`` with the same
    rid. Tokenised like a prompt (``add_special_tokens``: a BOS where the model adds one), or ``prompt_ids``
    as given; a text longer than the context is scored with a sliding window (stride: half the context).
    The worker runs one window at a time between steps, so generation goes on meanwhile."""

    op: ClassVar[str] = "score"
    rid: int
    text: str | None = None
    prompt_ids: list[int] | None = None
    add_special_tokens: bool = True


@dataclass
class Add(_Message):
    """Start a sequence and put it in the batch. ``session``: when a turn ends (stop or length) the engine keeps
    the sequence and its KV context, parked, for the next ``Append``, instead of dropping it."""

    op: ClassVar[str] = "add"
    pid: int
    prompt_ids: list[int]
    params: dict[str, Any]
    user: str = ""
    priority: int = 0
    session: bool = False
    output_ids: list[int] | None = None  # tokens already generated (a process resumed after a crash)


@dataclass
class Append(_Message):
    """A session's next turn: ``prompt_ids`` is the whole new context (the conversation so far, rendered).

    The engine keeps the KV of the longest common prefix with the context it holds, drops the rest, and
    prefills only the new tokens once the sequence is resumed. The sequence stays parked until ``Resume``.
    ``params`` replaces the sampling parameters for this turn when given."""

    op: ClassVar[str] = "append"
    pid: int
    prompt_ids: list[int]
    params: dict[str, Any] | None = None


@dataclass
class Preempt(_Message):
    """Take a sequence out of the batch (a context switch out): ``swap`` copies its KV blocks to the worker's
    host swap area, or to its spill area on disk when that is full or host memory is short (recompute when
    neither has room), ``recompute`` frees them; either way the pool's blocks
    are freed. A parked sequence (a session between turns) may be preempted too: its KV leaves the pool.
    The engine answers with a ``StepEvent`` whose ``preempted`` says what it did."""

    op: ClassVar[str] = "preempt"
    pid: int
    mode: str = "swap"


@dataclass
class Resume(_Message):
    """Put a parked sequence back in the batch (a context switch in): swapped KV is copied back, dropped KV is
    recomputed from its tokens. ``priority`` is its current nice value (a renice may have changed it)."""

    op: ClassVar[str] = "resume"
    pid: int
    priority: int = 0


@dataclass
class Renice(_Message):
    """A sequence's priority changed: it ranks by the new value when the engine must preempt under pressure."""

    op: ClassVar[str] = "renice"
    pid: int
    priority: int


@dataclass
class Abort(_Message):
    """End a sequence now (TERM, KILL, close, deadline), keeping and flushing what it generated. The engine
    answers with a final ``StepEvent`` (finish_reason ``killed``), even for a pid it does not know."""

    op: ClassVar[str] = "abort"
    pid: int


@dataclass
class Shutdown(_Message):
    op: ClassVar[str] = "shutdown"


# worker -> kernel ---------------------------------------------------------------------------------------------
@dataclass
class StepEvent:
    """What one sequence did in one step.

    ``token_ids``/``text``: new tokens and text. ``finish_reason`` set on its last event (for a session,
    the end of a turn when it is ``stop`` or ``length``: the sequence is parked, not gone). ``final_text``: the
    whole text of the run (or the turn) with the finish. ``error``: an error struct when finish_reason is
    ``error``. ``preempted``: ``swap`` or ``recompute`` when the engine took the sequence out of the batch
    (asked by ``Preempt``, or forced by memory pressure); ``recomputed`` counts the tokens a resume will
    recompute (0 for swap). ``prefilled``: prompt tokens computed this step (a session's turn cost)."""

    pid: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    final_text: str | None = None
    error: dict[str, Any] | None = None
    preempted: str | None = None
    recomputed: int = 0
    prefilled: int = 0

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pid": self.pid}
        if self.token_ids:
            out["token_ids"] = self.token_ids
        if self.text:
            out["text"] = self.text
        if self.finish_reason is not None:
            out["finish_reason"] = self.finish_reason
            out["final_text"] = self.final_text
            out["error"] = self.error
        if self.preempted is not None:
            out["preempted"] = self.preempted
            out["recomputed"] = self.recomputed
        if self.prefilled:
            out["prefilled"] = self.prefilled
        return out

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> "StepEvent":
        return cls(int(d["pid"]), list(d.get("token_ids") or ()), d.get("text") or "", d.get("finish_reason"),
                   d.get("final_text"), d.get("error"), d.get("preempted"), int(d.get("recomputed") or 0),
                   int(d.get("prefilled") or 0))


@dataclass
class Ready(_Message):
    """The model is loaded; ``info`` describes it (engine, context_len, kv_blocks, kv_block_size,
    kv_bytes_per_token, swap_blocks, swap_bytes_per_s, prefill_tokens_per_s, max_batch...)."""

    op: ClassVar[str] = "ready"
    info: dict[str, Any]


@dataclass
class Failed(_Message):
    """The load failed: an error struct's fields (errno says whose fault: EINVAL the model's files)."""

    op: ClassVar[str] = "failed"
    errno: int
    message: str
    error: str = ""  # the errno's name (optional: the number says it)


@dataclass
class Encoded(_Message):
    """The answer to ``Encode``: ``ids``, or an error struct's fields."""

    op: ClassVar[str] = "encoded"
    rid: int
    ids: list[int] | None = None
    errno: int | None = None
    error: str | None = None
    message: str | None = None


@dataclass
class Scored(_Message):
    """The answer to ``Score``: ``token_ids`` (the text's tokens), ``logprobs`` (natural log-probability of
    each token after the first, given those before it, float32 log_softmax), ``nll`` (minus their sum),
    ``windows`` (forward passes) and ``stride``; or an error struct's fields."""

    op: ClassVar[str] = "scored"
    rid: int
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    nll: float = 0.0
    windows: int = 0
    stride: int = 0
    errno: int | None = None
    error: str | None = None
    message: str | None = None


@dataclass
class Step(_Message):
    """Events of the steps since the last frame (a step with no event sends none: its time rides on the next),
    with the engine's stats (running, kv_used, kv_total, swap_used, preemptions...)."""

    op: ClassVar[str] = "step"
    events: list[StepEvent]
    running: int = 0
    step_s: float = 0.0
    steps: int = 0
    stats: dict[str, Any] | None = None


# A model load's stages in order, as a worker reports them (Heartbeat stats {"stage": ...} before Ready) and
# model_info shows them (executors[].stage); the kernel says the first until the worker speaks.
LOAD_STAGES = ("starting the worker", "importing torch and transformers", "reading weights", "building the KV pool")


@dataclass
class Heartbeat(_Message):
    op: ClassVar[str] = "hb"
    running: int = 0
    stats: dict[str, Any] | None = None


# captured intermediates (worker -> kernel; see drivers/model/capture.py) ------------------------------------
CAPTURE_KINDS = ("attentions", "hidden_states")


@dataclass
class Captured(_Message):
    """A piece of one captured tensor's ``.npy`` file (``np.save`` format, float32): ``data`` is the file's
    bytes from byte ``start`` (the first piece opens with the header), at most ``capture.FRAME_BYTES``;
    ``last`` marks the file's last piece. ``shape``: the whole array's ([tokens, hidden] for hidden_states,
    [tokens, heads, tokens] for attentions). ``key``: the kernel's key of this capture (from the spec in the
    process's params). A process's pieces come file after file, all before its ``CaptureDone``, which comes
    before the step frame that ends the process."""

    op: ClassVar[str] = "captured"
    pid: int
    key: int
    kind: str
    layer: int
    start: int
    shape: list[int]
    dtype: str
    data: bytes
    last: bool


@dataclass
class CaptureDone(_Message):
    """A process's capture is complete: ``tokens`` rows in each of ``files`` files (``heads``: the attention
    heads kept, in order); ``warnings`` say where it stopped (its byte limit) or why it is empty."""

    op: ClassVar[str] = "capture_done"
    pid: int
    key: int
    tokens: int
    files: int
    heads: list[int]
    warnings: list[str]
