"""Captured intermediates, the worker's side: what one sequence asked for, the rows kept so far, and the frames.

A process spawned with ``capture`` carries a spec in its params (``params["capture"]``, put there by the
kernel: kinds, layers, heads, the byte limit and the kernel's key). The engine computes the tensors beside
its forward pass, for the capturing sequences only, and hands each step's rows to :class:`SequenceCapture`,
which keeps them (in host memory, float32) until the sequence ends; then :meth:`SequenceCapture.frames`
turns each (kind, layer) into one ``.npy`` file (``np.save`` format) cut into ``protocol.Captured`` frames
of at most FRAME_BYTES, followed by one ``protocol.CaptureDone``. The worker sends them before the step
frame that ends the process, so the kernel has them before anyone can read the process's result.

Shapes (tokens = every position the model processed, prompt and generated tokens in order; the last
generated token is sampled, never fed back, so a finished process has prompt + output - 1):
  hidden_states[layer]: [tokens, hidden] for layer 0..L (L+1 entries, as transformers' output_hidden_states:
      0 is the embeddings' output, l the output of block l, and L the last block's output after the
      model's final norm);
  attentions[layer]: [tokens, heads, tokens] for layer 0..L-1, row t the softmax weights of position t over
      positions 0..t, zero beyond (lower-triangular); ``heads`` selects and orders the heads.
The byte limit counts whole files (header and data); the capture stops at the last token that fits, with a
warning, and the generation goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from llmos.drivers.model.capture_spec import DTYPE, KINDS, CaptureSpec, file_bytes, npy_header, resolve
from llmos.drivers.model.protocol import Captured, CaptureDone
from llmos.syscalls.errors import InvalidArgument

__all__ = ["KINDS", "CaptureSpec", "SequenceCapture", "Tap", "resolve", "start_capture", "tap_attention",
           "tap_hidden"]

FRAME_BYTES = 1 << 20  # data bytes per Captured frame


@dataclass
class SequenceCapture:
    """One sequence's captured rows, kept until it ends. Rows arrive in position order; a position is
    captured once (a recomputation after a preemption is not captured again)."""

    spec: CaptureSpec
    hidden_layers: list[int]
    attn_layers: list[int]
    heads: list[int]
    hidden_size: int
    tokens: int = 0  # positions captured so far (rows of every file)
    hidden: dict[int, list[torch.Tensor]] = field(default_factory=dict, repr=False)  # layer -> chunks [n, hidden]
    attn: dict[int, list[torch.Tensor]] = field(default_factory=dict, repr=False)  # layer -> [n, heads, chunk end]
    stopped: bool = False
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.hidden = {layer: [] for layer in self.hidden_layers}
        self.attn = {layer: [] for layer in self.attn_layers}

    def size(self, tokens: int) -> int:
        """Bytes of every file once ``tokens`` positions are captured."""
        h = len(self.hidden_layers) * file_bytes((tokens, self.hidden_size))
        return h + len(self.attn_layers) * file_bytes((tokens, len(self.heads), tokens))

    def span(self, start: int, n: int) -> tuple[int, int, bool]:
        """(lo, hi, capped): the positions of ``[start, start + n)`` to capture now, those not captured yet
        and within the byte limit (lo == hi: none), and whether the limit cuts them. Changes nothing: a step
        that yields or fails is captured again when it is redone."""
        lo, hi = max(start, self.tokens), start + n
        if self.stopped or lo >= hi:
            return lo, lo, False
        if self.size(hi) <= self.spec.max_bytes:
            return lo, hi, False
        fit = lo
        while fit < hi and self.size(fit + 1) <= self.spec.max_bytes:
            fit += 1
        return lo, fit, True

    def commit(self, lo: int, hi: int, capped: bool, hidden: dict[int, torch.Tensor],
               attn: dict[int, torch.Tensor]) -> None:
        """Keep the rows of positions ``[lo, hi)`` of a completed step: ``hidden[layer]`` [hi - lo, hidden],
        ``attn[layer]`` [hi - lo, heads, hi] (row t over positions 0..hi-1, zero past t). ``capped``: the
        byte limit stops the capture here (a warning says so)."""
        if hi > lo:
            if lo != self.tokens:
                raise AssertionError(f"capture rows {lo}..{hi} do not follow the {self.tokens} captured")
            for layer in self.hidden_layers:
                self.hidden[layer].append(hidden[layer].detach().to("cpu", torch.float32))
            for layer in self.attn_layers:
                self.attn[layer].append(attn[layer].detach().to("cpu", torch.float32))
            self.tokens = hi
        if capped and not self.stopped:
            self.stopped = True
            self.warnings.append(f"capture stopped at {self.tokens} tokens: {self.spec.limit_doc or 'its limit'} "
                                 f"({self.spec.max_bytes:,} bytes) holds no more")

    def frames(self, pid: int, frame_bytes: int = FRAME_BYTES) -> Iterator[Captured | CaptureDone]:
        """Every file as ``.npy`` bytes in frames of at most ``frame_bytes`` data bytes, then CaptureDone.
        Attention rows are padded to the final width here, one stored chunk at a time."""
        t = self.tokens
        files = 0
        if t:
            for layer in self.hidden_layers:
                yield from self._file(pid, "hidden_states", layer, (t, self.hidden_size),
                                      (c.contiguous().numpy().tobytes() for c in self.hidden[layer]), frame_bytes)
                self.hidden[layer] = []  # what was sent is freed as it goes
                files += 1
            for layer in self.attn_layers:
                yield from self._file(pid, "attentions", layer, (t, len(self.heads), t),
                                      (_pad(c, t) for c in self.attn[layer]), frame_bytes)
                self.attn[layer] = []
                files += 1
        elif not self.stopped:
            self.warnings.append("nothing was captured: the process ended before the model processed any of "
                                 "its tokens")
        yield CaptureDone(pid, self.spec.key, t, files, list(self.heads), list(self.warnings))

    def _file(self, pid: int, kind: str, layer: int, shape: tuple[int, ...], chunks: Iterator[bytes],
              frame_bytes: int) -> Iterator[Captured]:
        total = file_bytes(shape)
        buf = bytearray(npy_header(shape))
        start = 0
        for data in chunks:
            buf += data
            while len(buf) >= frame_bytes:
                piece = bytes(buf[:frame_bytes])
                del buf[:frame_bytes]
                yield Captured(pid, self.spec.key, kind, layer, start, list(shape), DTYPE, piece,
                               start + len(piece) == total)
                start += len(piece)
        if buf or start == 0:
            yield Captured(pid, self.spec.key, kind, layer, start, list(shape), DTYPE, bytes(buf), True)
            start += len(buf)
        if start != total:
            raise AssertionError(f"capture file {kind}/{layer} is {start} bytes, its header says {total}")


def _pad(chunk: torch.Tensor, width: int) -> bytes:
    """Attention rows [n, heads, w] padded with zeros to [n, heads, width], as bytes."""
    n, h, w = chunk.shape
    if w == width:
        return chunk.contiguous().numpy().tobytes()
    out = torch.zeros(n, h, width, dtype=torch.float32)
    out[:, :, :w] = chunk
    return out.numpy().tobytes()


def start_capture(params: Any, engine: Any, session: bool) -> SequenceCapture | None:
    """The capture a sequence added to ``engine`` with ``params`` makes (None when it asks none).
    InvalidArgument for a session (its turns rewrite its context), or what :func:`resolve` refuses."""
    spec = CaptureSpec.from_params(params)
    if spec is None:
        return None
    if session:
        raise InvalidArgument("a session cannot capture: its turns rewrite its context")
    hidden, attn, heads = resolve(spec, engine.shape.layers, engine.shape.heads, engine.capture_kinds, engine.kind)
    width = int(engine.model.get_input_embeddings().embedding_dim)
    return SequenceCapture(spec, hidden, attn, heads, width)


@dataclass
class Tap:
    """One step's capture for one sequence: positions ``[lo, hi)`` at rows ``rows`` of the packed batch, the
    cache ``slots`` of its positions 0..hi-1, and what the layers gave (kept only if the step completes)."""

    seq: Any
    lo: int
    hi: int
    capped: bool
    rows: torch.Tensor = field(repr=False)
    slots: torch.Tensor = field(repr=False)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    attn: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def commit(self) -> None:
        self.seq.capture.commit(self.lo, self.hi, self.capped, self.hidden, self.attn)


def tap_hidden(taps: list[Tap], layer: int, h: torch.Tensor, norm: Any = None) -> None:
    """Copy the residual stream rows ``h`` [N, hidden] of each tap that keeps ``layer`` (through ``norm``, the
    model's final RMSNorm module, for the last entry)."""
    for tap in taps:
        if tap.hi > tap.lo and layer in tap.seq.capture.hidden:
            rows = h.index_select(0, tap.rows)
            if norm is not None:
                rows = torch.nn.functional.rms_norm(rows, (rows.shape[-1],), norm.weight, norm.variance_epsilon)
            tap.hidden[layer] = rows.float()


def tap_attention(taps: list[Tap], layer: int, q: torch.Tensor, keys: torch.Tensor, n_kv: int,
                  scaling: float) -> None:
    """Softmax weights of each tap's query rows over its cached keys, float32, computed beside the step's own
    attention (which they do not touch): ``q`` [N, heads, head_dim] after the rotary embedding, ``keys`` the
    layer's key cache as [slots, kv_heads, head_dim] (this step's keys already written). Row t is zero past t."""
    for tap in taps:
        cap = tap.seq.capture
        if tap.hi <= tap.lo or layer not in cap.attn:
            continue
        group = q.shape[1] // n_kv  # grouped-query attention: query head h reads kv head h // group
        heads = torch.tensor(cap.heads, device=q.device)
        qh = q.index_select(0, tap.rows).index_select(1, heads).float()  # [m, h, D]
        kh = keys.index_select(0, tap.slots).index_select(1, heads // group).float()  # [hi, h, D]
        scores = torch.einsum("mhd,khd->mhk", qh, kh) * scaling
        pos = torch.arange(tap.lo, tap.hi, device=q.device)[:, None, None]
        scores.masked_fill_(torch.arange(tap.hi, device=q.device)[None, None, :] > pos, float("-inf"))
        tap.attn[layer] = torch.softmax(scores, dim=-1)
