"""The paged engine: continuous batching over a paged KV cache for the Llama family (Llama, Qwen2, Mistral).

Each step packs every running sequence's next token and chunks of waiting prompts (under a
token budget) into one flat batch, runs the model's own weights through a lean forward
pass, writes keys and values into pool blocks through each sequence's block table, and
samples one token for every sequence whose pending tokens are all computed. Sequences
join and leave between any two steps. When the pool runs dry, an idle session, else the newest
lowest-priority sequence, is preempted under the engine's memory contract (``BaseEngine._make_room``):
its blocks are copied to the host swap area (``index_select`` of its blocks, back with
``index_copy_``) or dropped, and it waits, parked, for the kernel's resume.

The forward reuses the transformers modules (projections, norms, MLP, rotary embedding), so
the numbers match ``generate``; only attention and the cache are ours.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from llmos.drivers.model import cpu_kernels
from llmos.drivers.model.capture import KINDS as CAPTURE_KINDS, Tap, tap_attention, tap_hidden
from llmos.drivers.model.engine import SWAP_PROBE_BYTES, BaseEngine, Sequence
from llmos.drivers.model.protocol import PAD_BLOCK, StepEvent, blocks_for
from llmos.drivers.model.sampling import sample_batch
from llmos.drivers.model.shape import PACK_LIMIT_BYTES, PAGED_MODEL_TYPES as SUPPORTED
from llmos.syscalls.errors import Errno



def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rms_norm(x: torch.Tensor, ln: Any) -> torch.Tensor:
    """RMSNorm of x's rows with ``ln``'s weight and epsilon: one fused op in float32; in a reduced precision
    rounded twice, as transformers' LlamaRMSNorm rounds (the normalised row, then its product with the weight)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), ln.weight, ln.variance_epsilon)
    return cpu_kernels.reference_rms_norm(x, ln.weight, ln.variance_epsilon)


GROUP_OVERHEAD_SLOTS = 256  # a decode group's fixed cost (two gathers and one attention call), in slot-rows


def _length_groups(ctx: list[int], block_size: int) -> list[tuple[int, int]]:
    """Split ascending context lengths into contiguous groups that minimise padded slots plus a per-group cost.

    Each group attends over its longest context, so one group for contexts 10..190 would gather
    and attend over 190 slots for every row. Exact dynamic programme; n is a batch, small.
    """
    n = len(ctx)
    pad = [-(-c // block_size) * block_size for c in ctx]
    best = [0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * pad[j - 1] + GROUP_OVERHEAD_SLOTS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups = []
    j = n
    while j > 0:
        groups.append((cut[j], j))
        j = cut[j]
    return groups[::-1]


class StepYielded(Exception):
    """The step in flight gave way to an urgent arrival (see ``PagedEngine._forward``)."""


class PagedEngine(BaseEngine):
    kind = "paged"
    can_spill = True
    capture_kinds = CAPTURE_KINDS
    # set by the worker: floor -> True when an op waits that brings a sequence of priority below floor
    urgent_waiting = None

    def __init__(self, model: Any, tokenizer: Any, device: torch.device, name: str = "model", **kw: Any) -> None:
        super().__init__(model, tokenizer, device, name, **kw)
        cfg = model.config
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.n_heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        block_size = self.pool.block_size
        dtype = next(model.parameters()).dtype
        # per layer: keys and values, one row per block: [blocks, block_size * kv_heads * head_dim]
        row = block_size * self.n_kv * self.head_dim
        self.k_cache = [torch.zeros(self.pool.num_blocks, row, dtype=dtype, device=device) for _ in self.layers]
        self.v_cache = [torch.zeros_like(k) for k in self.k_cache]
        self._kbuf = torch.empty(0, row, dtype=dtype, device=device)
        self._vbuf = torch.empty(0, row, dtype=dtype, device=device)
        # decode attention straight from the block tables and fused element-wise steps, when the native
        # CPU kernels build here; None keeps the pure-torch forward
        self.ops = cpu_kernels.load() if device.type == "cpu" and dtype in cpu_kernels.DTYPES else None
        self.silu = getattr(cfg, "hidden_act", "silu") == "silu"
        self._taps: list[Tap] = []  # the step in flight's captures (capture.py), kept if it completes
        self._fuse_projections()
        # a reduced-precision model's LM head also as float32 (vocab x hidden x 4 bytes, in the memory estimate):
        # logits, sampling and log-probabilities are float32 in every dtype
        head = self.model.lm_head
        self.lm_head32 = None if dtype == torch.float32 else (
            head.weight.detach().float(), None if head.bias is None else head.bias.detach().float())
        if self.lm_head32 is not None:
            self.lm_head = None  # a packed reduced-precision copy would never be used
        self.measure()

    # -- the swap area -----------------------------------------------------------------------
    def _copy_out(self, blocks: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (keys, values) of ``blocks`` copied to host memory: [len(blocks), block row] each."""
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        return [(k.index_select(0, idx).to("cpu"), v.index_select(0, idx).to("cpu"))
                for k, v in zip(self.k_cache, self.v_cache)]

    def _copy_in(self, blocks: list[int], data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        for kc, vc, (k, v) in zip(self.k_cache, self.v_cache, data):
            kc.index_copy_(0, idx, k.to(self.device))
            vc.index_copy_(0, idx, v.to(self.device))

    def _copy_block(self, src: int, dst: int) -> None:
        for kc, vc in zip(self.k_cache, self.v_cache):
            kc[dst].copy_(kc[src])
            vc[dst].copy_(vc[src])

    def _swap_out(self, seq: Sequence) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self._copy_out(self.pool.tables[seq.pid][:blocks_for(seq.computed, self.pool.block_size)])

    def _swap_in(self, seq: Sequence) -> None:
        self._copy_in(self.pool.tables[seq.pid][:seq.swap_blocks], seq.swap)

    def _swap_truncate(self, swap: list, blocks: int, tokens: int) -> list:
        # slots past ``tokens`` in the last block are overwritten before they are read
        return [(k[:blocks].clone(), v[:blocks].clone()) for k, v in swap]

    # -- the spill area (spill.py): one value per block, keys then values of layer 0, then layer 1... ----------
    def _spill_rows(self, seq: Sequence):
        table = self.pool.tables[seq.pid]

        def rows(lo: int, hi: int) -> list[memoryview]:
            per_layer = self._copy_out(table[lo:hi])  # L x (k, v), each [hi - lo, row] on the host
            # [blocks, 2L, row] as bytes: row i is block lo + i, the layout SpillArea stores
            flat = torch.stack([t for kv in per_layer for t in kv], dim=1).view(torch.uint8).numpy()
            return [memoryview(flat[i]).cast("B") for i in range(hi - lo)]

        return rows

    def _spill_in(self, seq: Sequence) -> bool:
        table = self.pool.tables[seq.pid]
        dtype, row = self.k_cache[0].dtype, self.k_cache[0].shape[1]

        def into(lo: int, values: list[memoryview]) -> None:
            n = len(values)
            flat = torch.frombuffer(bytearray(b"".join(values)), dtype=torch.uint8).view(dtype).view(n, -1, row)
            self._copy_in(table[lo:lo + n], [(flat[:, 2 * i], flat[:, 2 * i + 1]) for i in range(len(self.layers))])

        return self.spill.read(seq.pid, into)

    def _measure_swap(self) -> float:
        """Bytes per second through the real swap path: a few MB of blocks copied out and back."""
        row_bytes = 2 * len(self.layers) * self.k_cache[0].shape[1] * self.k_cache[0].element_size()
        n = max(1, min(self.pool.capacity, SWAP_PROBE_BYTES // row_bytes))
        blocks = [b for b in range(self.pool.num_blocks) if b != PAD_BLOCK][:n]
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            self._copy_in(blocks, self._copy_out(blocks))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            best = min(best, time.perf_counter() - t)
        return 2 * len(blocks) * row_bytes / max(best, 1e-9)

    def _fuse_projections(self) -> None:
        """One GEMM for q, k and v and one for gate and up: fewer, larger matmuls per layer.

        The fused matrices become the storage; the modules' weights are re-pointed to views of
        them, so memory does not grow and the transformers model keeps working unchanged.
        """
        self.fused: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        for layer in self.layers:
            a, mlp = layer.self_attn, layer.mlp
            projs = (a.q_proj, a.k_proj, a.v_proj)
            w_qkv = torch.cat([p.weight.data for p in projs])
            b_qkv = torch.cat([p.bias.data for p in projs]) if a.q_proj.bias is not None else None
            w_gu = torch.cat([mlp.gate_proj.weight.data, mlp.up_proj.weight.data])
            row = 0
            for p in projs:
                n = p.weight.shape[0]
                p.weight = torch.nn.Parameter(w_qkv[row:row + n], requires_grad=False)
                if b_qkv is not None:
                    p.bias = torch.nn.Parameter(b_qkv[row:row + n], requires_grad=False)
                row += n
            g = mlp.gate_proj.weight.shape[0]
            mlp.gate_proj.weight = torch.nn.Parameter(w_gu[:g], requires_grad=False)
            mlp.up_proj.weight = torch.nn.Parameter(w_gu[g:], requires_grad=False)
            self.fused.append((w_qkv, b_qkv, w_gu))
        self._pack_for_cpu()

    def _pack_for_cpu(self) -> None:
        """On the CPU, run every linear through oneDNN with weights reordered once, at load.

        oneDNN's packed GEMM suits the skinny matrices of a decode step better than the default BLAS
        path. The packed copies double the weights' memory, so this applies to models up to
        PACK_LIMIT_BYTES; larger ones use F.linear.
        """
        self.lm_head = (self.model.lm_head.weight, self.model.lm_head.bias)
        plain = [(w_qkv, b_qkv, layer.self_attn.o_proj.weight, layer.self_attn.o_proj.bias, w_gu,
                  layer.mlp.down_proj.weight, layer.mlp.down_proj.bias)
                 for (w_qkv, b_qkv, w_gu), layer in zip(self.fused, self.layers)]
        self.linear = F.linear
        self.linears = plain
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if self.device.type != "cpu" or weight_bytes > PACK_LIMIT_BYTES or not torch.backends.mkldnn.is_available():
            return
        try:
            pack = torch.ops.mkldnn._reorder_linear_weight
            run = torch.ops.mkldnn._linear_pointwise

            def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
                return run(x, w, b, "none", [], "")

            packed = [(pack(a, None), ab, pack(o, None), ob, pack(g, None), pack(d, None), db)
                      for a, ab, o, ob, g, d, db in plain]
            lm_head = (pack(self.lm_head[0].detach(), None), self.lm_head[1])
            x = torch.zeros(2, self.lm_head[0].shape[1], dtype=self.lm_head[0].dtype)
            if not torch.allclose(linear(x, *lm_head), F.linear(x, *self.lm_head), atol=1e-4):
                return
        except Exception:  # an older torch or a build without oneDNN: keep F.linear
            return
        self.linear, self.linears, self.lm_head = linear, packed, lm_head

    def _workspace(self, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather buffers reused across layers and steps; they only grow."""
        if self._kbuf.shape[0] < blocks:
            size = max(blocks, 2 * self._kbuf.shape[0])
            self._kbuf = torch.empty(size, self._kbuf.shape[1], dtype=self._kbuf.dtype, device=self.device)
            self._vbuf = torch.empty_like(self._kbuf)
        return self._kbuf, self._vbuf

    def info(self) -> dict[str, Any]:
        return {**super().info(), "kernels": "native" if self.ops is not None else "torch",
                "kernel_path": self.kernel_path()}

    def kernel_path(self) -> str:
        """How a step runs, for model_info: the attention and element-wise kernels (native C or torch) and
        their precision, the GEMM path, and the CPU's vector unit as torch sees it."""
        dtype = str(self.k_cache[0].dtype).replace("torch.", "")
        packed = self.linear is not F.linear
        if self.device.type != "cpu":
            return f"torch on {self.device.type}, {dtype}"
        acc = "" if dtype == "float32" else ", float32 accumulation"
        ops = f"native C ({dtype}{acc})" if self.ops is not None else f"torch ({dtype})"
        isa = torch.backends.cpu.get_cpu_capability()
        return f"attention+norm+rotary+SiLU: {ops}; linear: {'oneDNN packed' if packed else 'torch'} ({isa})"

    @staticmethod
    def supports(model: Any) -> bool:
        cfg = model.config
        if getattr(cfg, "model_type", None) not in SUPPORTED:
            return False
        window = getattr(cfg, "sliding_window", None)
        if window and getattr(cfg, "use_sliding_window", True) and window < cfg.max_position_embeddings:
            return False
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
            return False
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        inv_freq = getattr(inner.rotary_emb, "inv_freq", None)
        if inv_freq is not None and 2 * inv_freq.numel() != head_dim:
            return False  # a rotary embedding over part of each head: the lean forward rotates whole heads
        return all(hasattr(layer.self_attn, "q_proj") and not hasattr(layer.self_attn, "q_norm")
                   for layer in inner.layers)

    # -- planning ----------------------------------------------------------------------------
    @staticmethod
    def _urgent_cut(order: list[Sequence]) -> int | None:
        """The priority at or below which this step runs, when a prompt ranks strictly better than every
        decoding sequence (else None: everyone runs).

        An urgent prompt then gets a step of its own (with anything as urgent): its first token costs
        one prefill, not a prefill inside the whole batch's decode step; the batch waits one step.
        """
        decoding = [s.priority for s in order if not s.parked and s.computed and len(s.tokens) - s.computed == 1]
        prompts = [s.priority for s in order if not s.parked and not (s.computed and len(s.tokens) - s.computed == 1)]
        if decoding and prompts and min(prompts) < min(decoding):
            return min(prompts)
        return None

    def _plan(self, urgent_first: bool = True) -> tuple[list[tuple[Sequence, int, int]], list[StepEvent]]:
        """Choose (sequence, start, count) for this step among the active sequences; allocate their blocks.

        Decoding sequences go first, in rank order, each making room for its next token under the
        engine's memory contract (``BaseEngine._make_room``: an idle session, else a lower-ranked
        sequence is parked); then prompts (new, resumed to recompute, or a session's new turn), in rank
        order, under the token budget. A prompt only takes blocks from idle sessions: otherwise it
        waits for free blocks. ``max_batch`` (when set) caps the sequences per step; else each decoding
        sequence takes one token of ``max_tokens_per_step``.
        """
        events: list[StepEvent] = []
        budget = self.max_tokens_per_step
        seats = self.max_batch_cap or budget
        order = self.active()
        plan: list[tuple[Sequence, int, int]] = []
        planned: set[int] = set()
        cut = self._urgent_cut(order) if urgent_first else None
        for seq in order:
            if budget <= 0 or len(plan) >= seats:
                break
            if seq.parked or seq.computed == 0 or len(seq.tokens) - seq.computed != 1:
                continue  # parked by a preemption above, or not decoding
            if cut is not None and seq.priority > cut:
                continue  # this step is an urgent prompt's
            room = self._make_room(seq, seq.computed + 1, planned)
            if isinstance(room, StepEvent):
                events.append(room)
            elif room and len(seq.tokens) - seq.computed != 1:
                continue  # its spilled KV could not be read back: a prompt again, recomputed below
            elif room:
                plan.append((seq, seq.computed, 1))
                planned.add(seq.pid)
                budget -= 1
        for seq in order:
            if budget <= 0 or len(plan) >= seats:
                break
            if seq.pid in planned or seq.pid not in self.seqs or seq.parked:
                continue
            if cut is not None and seq.priority > cut:
                continue
            failed = self._never_fits(seq, len(seq.tokens))
            if failed is not None:
                events.append(failed)
                continue
            reused = self._reuse_prefix(seq)  # from position 0: cached blocks of the same prefix start its table
            n = min(len(seq.tokens) - seq.computed, budget)
            room = self._make_room(seq, seq.computed + n, planned, active_victims=False)
            if isinstance(room, StepEvent):
                events.append(room)
                continue
            if not room:
                capped = self._capped(seq, seq.computed + n)  # before _unshare gives the user's hit blocks back
                if reused:
                    self._unshare(seq)
                if capped:
                    continue  # this user waits for its own blocks; others go on
                break  # keep arrival order: later prompts wait for memory too
            plan.append((seq, seq.computed, n))
            planned.add(seq.pid)
            budget -= n
        if cut is not None and not plan:  # the urgent prompt waits for memory: the batch must run to free it
            more, later = self._plan(urgent_first=False)
            return more, events + later
        return plan, events

    def _grow_cache(self, extra: int) -> None:
        self.k_cache = [torch.cat([k, torch.zeros(extra, k.shape[1], dtype=k.dtype, device=k.device)])
                        for k in self.k_cache]
        self.v_cache = [torch.cat([v, torch.zeros(extra, v.shape[1], dtype=v.dtype, device=v.device)])
                        for v in self.v_cache]

    def _shrink_cache(self, blocks: int) -> None:
        self.k_cache = [k[:blocks].clone() for k in self.k_cache]
        self.v_cache = [v[:blocks].clone() for v in self.v_cache]

    # -- the step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def _step(self) -> list[StepEvent]:
        plan, events = self._plan()
        plan.sort(key=lambda item: (item[2] != 1, item[1]))  # one-token entries first, by context length
        self.steps += 1
        self.last_batch = len(plan)
        self.last_step_tokens = sum(n for _, _, n in plan)
        if not plan:
            return events
        floor = min(seq.priority for seq, _, _ in plan)
        self._taps = []
        try:
            logits = self._forward(plan, floor)
        except StepYielded:  # an urgent sequence arrived: nothing of this step is kept (its KV writes are redone)
            self.yields += 1
            self.last_step_tokens = 0
            return events
        except Exception as exc:  # a failed forward fails this step's sequences, not the worker
            for seq, _, _ in plan:
                events.append(self._fail(seq, Errno.EIO, f"model step failed: {type(exc).__name__}: {exc}"))
            return events
        for tap in self._taps:  # captured rows are kept only once the step completes
            tap.commit()
        self._taps = []
        sampled_seqs: list[Sequence] = []
        for seq, start, n in plan:
            seq.computed = start + n
            self._prefilled(seq, start, n)
            self._register_blocks(seq)  # before _accept: a sequence that ends leaves its blocks cached
            if seq.computed == len(seq.tokens):
                sampled_seqs.append(seq)
        tokens = sample_batch(logits, [s.params for s in sampled_seqs], [s.generator for s in sampled_seqs],
                              [s.tokens for s in sampled_seqs])
        for seq, tok in zip(sampled_seqs, tokens):
            events.append(self._accept(seq, tok))
        self._shrink_if_idle()
        return events

    def _padded_tables(self, plan: list[tuple[Sequence, int, int]], width: int) -> list[int]:
        """The block tables of the planned sequences, each cut or padded to ``width`` blocks, flattened.
        PAD_BLOCK pads: masks (torch) or context lengths (native) keep it out of the attention."""
        rows: list[int] = []
        for seq, _, _ in plan:
            t = self.pool.tables[seq.pid][:width]
            rows.extend(t + [PAD_BLOCK] * (width - len(t)))
        return rows

    def _capture_taps(self, plan: list[tuple[Sequence, int, int]]) -> list[Tap]:
        """The captures this step makes: for each planned sequence that captures, the positions it computes
        that are not captured yet (within its byte limit), their rows in the packed batch and the cache slots
        of its positions up to them. Empty (nearly always) when no sequence captures: the step is unchanged."""
        taps: list[Tap] = []
        offset, bs, dev = 0, self.pool.block_size, self.device
        for seq, start, n in plan:
            if seq.capture is not None and not seq.capture.stopped:
                lo, hi, capped = seq.capture.span(start, n)
                if hi > lo or capped:
                    table = self.pool.tables[seq.pid]
                    rows = torch.arange(offset + lo - start, offset + hi - start, device=dev)
                    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(hi)], dtype=torch.long,
                                         device=dev)
                    taps.append(Tap(seq, lo, hi, capped, rows, slots))
            offset += n
        return taps

    def _norm(self, h: torch.Tensor, delta: torch.Tensor | None, ln: Any) -> torch.Tensor:
        """``h += delta`` in place (the residual), then the layer's RMSNorm of h."""
        if self.ops is not None:
            return self.ops.add_rms_norm(h, delta, ln.weight, ln.variance_epsilon)
        if delta is not None:
            h.add_(delta)
        return _rms_norm(h, ln)

    def _rotary(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotary embedding on the queries and keys of the fused projection; returns views q, k, v."""
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        if self.ops is not None:
            qk = self.ops.rope(qkv, cos, sin, H + KV, D)[:, :(H + KV) * D].view(-1, H + KV, D)
        else:
            qk = qkv[:, :(H + KV) * D].view(-1, H + KV, D)
            qk = qk * cos[:, None] + _rotate_half(qk) * sin[:, None]
        return qk[:, :H], qk[:, H:], qkv[:, (H + KV) * D:]

    def _act(self, mlp: Any, gate_up: torch.Tensor) -> torch.Tensor:
        """The gated MLP's activation: act(gate) * up, from the fused gate|up projection."""
        if self.ops is not None and self.silu:
            return self.ops.silu_mul(gate_up.contiguous())
        gate, up = gate_up.split(gate_up.shape[1] // 2, dim=1)
        return mlp.act_fn(gate) * up

    def _forward(self, plan: list[tuple[Sequence, int, int]], floor: int | None = None) -> torch.Tensor:
        """One forward over the packed batch; returns logits for the sequences that sample this step.

        Between layers it asks ``urgent_waiting(floor)`` (set by the worker: is an op waiting that brings
        a sequence ranking strictly better than ``floor``, the best priority in this step?) and raises
        StepYielded when so: a step is preemptible at layer granularity, so an urgent arrival waits at
        most one layer of the step in flight, not all of it. Nothing the step did is kept: ``computed``
        only advances after the forward, and the slots it wrote are written again by the redo.

        ``plan`` is ordered decodes first (one token each), so the first ``nd`` packed tokens are
        the decode queries and need no gather.
        """
        dev, bs = self.device, self.pool.block_size
        ids: list[int] = []
        pos: list[int] = []
        slot_list: list[int] = []
        for seq, start, n in plan:
            table = self.pool.tables[seq.pid]
            ids.extend(seq.tokens[start:start + n])
            pos.extend(range(start, start + n))
            slot_list.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
        n_tok = len(ids)
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        positions = torch.tensor(pos, dtype=torch.long, device=dev)
        slot_mapping = torch.tensor(slot_list, dtype=torch.long, device=dev)

        nd = 0
        while nd < len(plan) and plan[nd][2] == 1:
            nd += 1
        dec = []  # decode groups of similar context length: (first row, end row, blocks, mask, slots)
        native = None  # or (block tables, context lengths) for the native kernel
        if nd and self.ops is not None:
            width = -(-(plan[nd - 1][1] + 1) // bs)  # the longest decode context, in blocks
            native = (torch.tensor(self._padded_tables(plan[:nd], width), dtype=torch.int32).view(nd, width),
                      torch.tensor([start + 1 for _, start, _ in plan[:nd]], dtype=torch.int32))
        elif nd:
            ctx = [plan[i][1] + 1 for i in range(nd)]  # ascending: step() sorts the decodes by length
            used = 0
            groups = _length_groups(ctx, bs)
            for lo, hi in groups:
                nblk = -(-ctx[hi - 1] // bs)
                rows = self._padded_tables(plan[lo:hi], nblk)
                ctx_t = torch.tensor(ctx[lo:hi], device=dev)
                mask = (torch.arange(nblk * bs, device=dev)[None, :] < ctx_t[:, None])[:, None, None, :]
                dec.append((lo, hi, torch.tensor(rows, dtype=torch.long, device=dev), mask, nblk * bs, used))
                used += len(rows)
            kbuf, vbuf = self._workspace(used)
        pre = []
        offset = nd
        for seq, start, n in plan[nd:]:
            end = start + n
            slots = mask = None
            if start > 0:  # a later chunk of a long prompt (or a 1-token tail): attend to the cached part too
                table = self.pool.tables[seq.pid]
                slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(end)], device=dev)
                q_pos = torch.arange(start, end, device=dev)[:, None]
                mask = torch.arange(end, device=dev)[None, :] <= q_pos
            pre.append((offset, n, slots, mask))
            offset += n

        self._taps = taps = self._capture_taps(plan)
        h = self.inner.embed_tokens(input_ids)  # [N, hidden], a fresh tensor: the residual adds go in place
        cos, sin = self.inner.rotary_emb(h[None], positions[None])
        cos, sin = cos[0].contiguous(), sin[0].contiguous()  # [N, head_dim]
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        gqa = KV != H
        linear = self.linear
        delta = None  # the previous layer's MLP output; the next norm adds it to h
        check = self.urgent_waiting if floor is not None else None
        for li, layer in enumerate(self.layers):
            if check is not None and li and check(floor):
                raise StepYielded()
            attn = layer.self_attn
            w_qkv, b_qkv, w_o, b_o, w_gu, w_down, b_down = self.linears[li]
            x = self._norm(h, delta, layer.input_layernorm)  # h is now the residual stream entering block li
            if taps:
                tap_hidden(taps, li, h)
            qkv = linear(x, w_qkv, b_qkv)
            q, k, v = self._rotary(qkv, cos, sin)
            kc, vc = self.k_cache[li], self.v_cache[li]  # [blocks, block_size * KV * D]
            kc.view(-1, KV * D).index_copy_(0, slot_mapping, k.reshape(n_tok, KV * D))
            vc.view(-1, KV * D).index_copy_(0, slot_mapping, v)
            if taps:
                tap_attention(taps, li, q, kc.view(-1, KV, D), KV, attn.scaling)
            out = torch.empty(n_tok, H, D, dtype=q.dtype, device=dev)
            if native is not None:
                self.ops.paged_decode(q[:nd], kc, vc, native[0], native[1], out[:nd], bs, attn.scaling)
            for lo, hi, blocks, mask, s, at in dec:
                # gather whole blocks into a reused workspace: fresh large buffers cost page faults
                b, nb = hi - lo, blocks.numel()
                kd = torch.index_select(kc, 0, blocks, out=kbuf[at:at + nb]).view(b, s, KV, D).transpose(1, 2)
                vd = torch.index_select(vc, 0, blocks, out=vbuf[at:at + nb]).view(b, s, KV, D).transpose(1, 2)
                od = F.scaled_dot_product_attention(q[lo:hi, :, None, :], kd, vd, attn_mask=mask, scale=attn.scaling,
                                                    enable_gqa=gqa)
                out[lo:hi] = od[:, :, 0, :]
            for off, n, slots, mask in pre:
                if slots is None:  # a whole prompt from position 0: its keys are this step's keys
                    kp = k[off:off + n].transpose(0, 1)[None]
                    vp = v[off:off + n].view(n, KV, D).transpose(0, 1)[None]
                else:
                    kp = kc.view(-1, KV, D).index_select(0, slots).transpose(0, 1)[None]
                    vp = vc.view(-1, KV, D).index_select(0, slots).transpose(0, 1)[None]
                qp = q[off:off + n].transpose(0, 1)[None]  # [1, H, n, D]
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=mask is None,
                                                    scale=attn.scaling, enable_gqa=gqa)
                out[off:off + n] = op[0].transpose(0, 1)
            x = self._norm(h, linear(out.view(n_tok, H * D), w_o, b_o), layer.post_attention_layernorm)
            delta = linear(self._act(layer.mlp, linear(x, w_gu)), w_down, b_down)
        h.add_(delta)
        if taps:  # transformers' last hidden state is the last block's output after the final norm
            tap_hidden(taps, len(self.layers), h, self.inner.norm)
        # logits only where a token is sampled: the last planned token of each finished-pending sequence
        last = []
        offset = 0
        for seq, start, n in plan:
            offset += n
            if start + n == len(seq.tokens):
                last.append(offset - 1)
        if not last:
            return torch.empty(0, device=dev)
        norm = self.inner.norm
        hl = h.index_select(0, torch.tensor(last, device=dev))
        hl = _rms_norm(hl, norm)
        if self.lm_head32 is not None:  # logits in float32 whatever the model's dtype: no ties from rounding
            return F.linear(hl.float(), *self.lm_head32)
        return self.linear(hl, *self.lm_head).float()
