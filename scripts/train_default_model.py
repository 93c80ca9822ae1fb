#!/usr/bin/env python3
"""Train LLMOS's small default causal LM on Python stdlib docstrings and save it to drivers/models/default.

The whole pipeline runs offline and on CPU, and is reproducible from a seed:

1. **Corpus.**  Walk the standard-library source directory of the running
   interpreter (``sysconfig.get_paths()["stdlib"]``), skipping
   ``site-packages``, the test suites, ``idlelib``, ``lib2to3`` and
   ``turtledemo``.  Every ``.py`` file is parsed with :mod:`ast` (nothing is
   imported) and the module, class and function docstrings are collected,
   cleaned with :func:`inspect.cleandoc`, filtered by length, de-duplicated and
   shuffled with a fixed seed.  A small slice is held out for validation.
2. **Tokenizer.**  A byte-level BPE tokenizer (``tokenizers`` library,
   ByteLevel pre-tokenizer and decoder, so any Unicode text round-trips) with
   the special tokens ``<|endoftext|>``, ``<|im_start|>`` and ``<|im_end|>``,
   wrapped as a :class:`transformers.PreTrainedTokenizerFast` with a ChatML
   chat template.
3. **Model.**  A randomly initialised :class:`transformers.LlamaForCausalLM`
   trained on packed sequences (each docstring followed by ``<|endoftext|>``)
   with AdamW, linear warmup and cosine decay, for a wall-clock budget
   (``--minutes``) or a fixed number of steps (``--steps``).
4. **Export.**  Weights (float16), config, generation config, tokenizer files
   and a model card (``README.md``) are written in Hugging Face format.

Usage::

    python scripts/train_default_model.py                 # 20 minutes, writes drivers/models/default
    python scripts/train_default_model.py --steps 20 --out /tmp/smoke   # quick smoke test
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "drivers" / "models" / "default"

EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END]

SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"})

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# --------------------------------------------------------------------------- #
# Corpus
# --------------------------------------------------------------------------- #
def iter_stdlib_files(root: Path) -> Iterator[Path]:
    """Yield the stdlib ``.py`` files under *root* in a deterministic order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def extract_docstrings(path: Path) -> list[str]:
    """Return the cleaned module/class/function docstrings of one source file."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    docs: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                docs.append(inspect.cleandoc(doc).strip())
    return docs


def build_corpus(min_chars: int, max_chars: int, seed: int) -> tuple[list[str], int]:
    """Collect, filter, de-duplicate and shuffle stdlib docstrings.

    Returns the shuffled docstrings and the number of files parsed.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    docs: list[str] = []
    n_files = 0
    for path in iter_stdlib_files(root):
        n_files += 1
        for doc in extract_docstrings(path):
            if len(doc) < min_chars:
                continue
            doc = doc[:max_chars]
            if doc not in seen:
                seen.add(doc)
                docs.append(doc)
    random.Random(seed).shuffle(docs)
    return docs, n_files


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #
def train_tokenizer(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on *docs* and wrap it for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=EOT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def encode_stream(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> torch.Tensor:
    """Tokenize *docs* into one flat stream, each document followed by ``<|endoftext|>``."""
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    encodings = tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    ids: list[int] = []
    for enc in encodings:
        ids.extend(enc.ids)
        ids.append(eot_id)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
@dataclass
class TrainStats:
    """Summary of a training run, used for logging and the model card."""

    steps: int
    seconds: float
    tokens_seen: int
    train_loss: float
    val_loss: float


def lr_at(progress: float, step: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warmup over *warmup* steps, then cosine decay from *peak* to *floor* over *progress* in [0, 1]."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(max(progress, 0.0), 1.0)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """Sample *batch_size* random windows of ``seq_len`` tokens from *data*."""
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=gen)
    return torch.stack([data[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, data: torch.Tensor, seq_len: int, batch_size: int, max_batches: int) -> float:
    """Mean next-token loss over consecutive non-overlapping windows of *data*."""
    model.eval()
    n_windows = min(data.numel() // seq_len, max_batches * batch_size)
    windows = data[: n_windows * seq_len].view(n_windows, seq_len)
    total, count = 0.0, 0
    for i in range(0, n_windows, batch_size):
        batch = windows[i : i + batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        total += loss.item() * batch.size(0)
        count += batch.size(0)
    model.train()
    return total / max(count, 1)


def train(
    model: LlamaForCausalLM,
    train_data: torch.Tensor,
    val_data: torch.Tensor,
    args: argparse.Namespace,
) -> TrainStats:
    """Train *model* for ``args.minutes`` of wall-clock time or ``args.steps`` steps."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    budget_s = args.minutes * 60.0 if args.steps is None else math.inf
    max_steps = args.steps if args.steps is not None else sys.maxsize
    warmup = min(args.warmup, max(1, max_steps // 10))
    floor = args.lr * args.min_lr_ratio

    model.train()
    start = time.perf_counter()
    step, tokens, ema = 0, 0, None
    while True:
        elapsed = time.perf_counter() - start
        progress = step / max_steps if args.steps is not None else elapsed / budget_s
        if step >= max_steps or progress >= 1.0:
            break
        lr = lr_at(progress, step, warmup, args.lr, floor)
        for group in optimizer.param_groups:
            group["lr"] = lr

        batch = get_batch(train_data, args.batch_size, args.seq_len, gen)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()

        step += 1
        tokens += batch.numel()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % args.log_every == 0 or step == 1:
            elapsed = time.perf_counter() - start
            print(
                f"step {step:5d} | loss {loss.item():.4f} (ema {ema:.4f}) | lr {lr:.2e} | "
                f"{tokens / elapsed:,.0f} tok/s | {elapsed / 60:.1f} min",
                flush=True,
            )
        if args.eval_every and step % args.eval_every == 0:
            print(f"step {step:5d} | val loss {evaluate(model, val_data, args.seq_len, args.batch_size, 8):.4f}", flush=True)

    seconds = time.perf_counter() - start
    val_loss = evaluate(model, val_data, args.seq_len, args.batch_size, args.eval_batches)
    train_loss = evaluate(model, train_data, args.seq_len, args.batch_size, args.eval_batches)
    return TrainStats(steps=step, seconds=seconds, tokens_seen=tokens, train_loss=train_loss, val_loss=val_loss)


# --------------------------------------------------------------------------- #
# Export
# --------------------------------------------------------------------------- #
def sample(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy continuation of *prompt* (used for logging and the model card)."""
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.2)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def write_model_card(
    out: Path,
    config: LlamaConfig,
    n_params: int,
    stats: TrainStats,
    corpus: dict[str, int],
    samples: dict[str, str],
    command: str,
    seq_len: int,
) -> None:
    """Write ``README.md`` describing the model, its data and how it was trained."""
    size_mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6
    samples_md = "\n\n".join(f"Prompt `{p}` →\n\n```text\n{s}\n```" for p, s in samples.items())
    card = f"""# LLMOS default model

A tiny decoder-only language model (Llama architecture, {n_params / 1e6:.2f}M parameters) that ships with
LLMOS so the kernel always has a local causal LM to load, run and test against: no network, no GPU.
It writes English-ish, Python-docstring-flavoured text. It is **not** a useful assistant; it is
a fixture that behaves like a real Hugging Face model.

## Shape

| field | value |
|---|---|
| architecture | `LlamaForCausalLM` |
| parameters | {n_params:,} ({n_params / 1e6:.2f}M, tied input/output embeddings) |
| layers | {config.num_hidden_layers} |
| hidden size | {config.hidden_size} |
| MLP (SwiGLU) size | {config.intermediate_size} |
| attention heads / KV heads | {config.num_attention_heads} / {config.num_key_value_heads} |
| max positions | {config.max_position_embeddings} (trained on {seq_len}-token windows) |
| vocabulary | {config.vocab_size} (byte-level BPE) |
| weights | `model.safetensors`, float16 (load with `dtype=torch.float32` for CPU) |
| files on disk | {size_mb:.1f} MB |

## Tokenizer

Byte-level BPE trained with the `tokenizers` library on the same corpus: any Unicode text
(e.g. Chinese) encodes and decodes losslessly, falling back to bytes. Special tokens:
`<|endoftext|>` (bos / eos / pad / unk), `<|im_start|>`, `<|im_end|>`. The tokenizer does not add
special tokens by itself. A ChatML chat template is included
(`<|im_start|>{{role}}\\n{{content}}<|im_end|>\\n`, generation prompt `<|im_start|>assistant\\n`);
the model never saw chat data, so this only makes the chat path work mechanically.

## Training data

The docstrings (module, class and function) of the Python {platform.python_version()} standard library,
extracted with `ast` from the source files (no imports). `site-packages`, `test`/`tests`,
`idlelib`, `lib2to3` and `turtledemo` are skipped. Docstrings are cleaned with `inspect.cleandoc`,
those under {corpus['min_chars']} characters dropped, duplicates removed and the rest shuffled with a fixed
seed. {corpus['files']} files gave {corpus['docs']:,} docstrings ({corpus['chars']:,} characters);
{corpus['val_docs']:,} docstrings are held out for validation. Each docstring is followed by
`<|endoftext|>` and the stream is packed into {seq_len}-token windows:
{corpus['train_tokens']:,} training tokens, {corpus['val_tokens']:,} validation tokens.

## Training

Random initialisation (seed {corpus['seed']}), AdamW (β = 0.9, 0.95, weight decay {corpus['weight_decay']}),
peak learning rate {corpus['lr']:g} with linear warmup and cosine decay, batch
{corpus['batch_size']} × {seq_len} tokens, gradient clipping 1.0, float32, on a **2-core CPU**
(`torch.set_num_threads(2)`).

| | |
|---|---|
| steps | {stats.steps:,} |
| tokens seen | {stats.tokens_seen:,} (≈ {stats.tokens_seen / max(corpus['train_tokens'], 1):.1f} epochs) |
| training time | {stats.seconds / 60:.1f} min |
| final train loss | {stats.train_loss:.3f} |
| final validation loss | {stats.val_loss:.3f} (perplexity {math.exp(stats.val_loss):.1f}) |

Retrain (reproducible up to wall-clock effects on the number of steps):

```bash
{command}
```

## Usage

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("drivers/models/default")
model = AutoModelForCausalLM.from_pretrained("drivers/models/default", dtype=torch.float32)
ids = tok("Return the", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=40, do_sample=False, repetition_penalty=1.2)
print(tok.decode(out[0], skip_special_tokens=True))
```

## Samples (greedy, repetition penalty 1.2)

{samples_md}
"""
    (out / "README.md").write_text(card, encoding="utf-8")


# --------------------------------------------------------------------------- #
# Entry point
# --------------------------------------------------------------------------- #
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=20.0, help="wall-clock training budget (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="train a fixed number of steps instead of --minutes")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--min-chars", type=int, default=40, help="drop docstrings shorter than this")
    p.add_argument("--max-chars", type=int, default=4000, help="truncate docstrings longer than this")
    p.add_argument("--val-fraction", type=float, default=0.03)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=0, help="quick validation every N steps (0: only at the end)")
    p.add_argument("--eval-batches", type=int, default=16)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build the corpus and tokenizer, train the model and save everything to ``--out``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    command = "python scripts/train_default_model.py " + " ".join(argv if argv is not None else sys.argv[1:])

    t0 = time.perf_counter()
    docs, n_files = build_corpus(args.min_chars, args.max_chars, args.seed)
    n_val = max(1, int(len(docs) * args.val_fraction))
    val_docs, train_docs = docs[:n_val], docs[n_val:]
    print(f"corpus: {n_files} files, {len(docs)} docstrings, {sum(map(len, docs)):,} chars "
          f"({len(train_docs)} train / {len(val_docs)} val) in {time.perf_counter() - t0:.1f}s", flush=True)

    tokenizer = train_tokenizer(train_docs, args.vocab_size)
    train_data = encode_stream(tokenizer, train_docs)
    val_data = encode_stream(tokenizer, val_docs)
    print(f"tokenizer: vocab {len(tokenizer)}, {train_data.numel():,} train / {val_data.numel():,} val tokens", flush=True)

    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters ({args.layers} layers, hidden {args.hidden_size}, "
          f"{args.heads} heads)", flush=True)

    stats = train(model, train_data, val_data, args)
    print(f"done: {stats.steps} steps in {stats.seconds / 60:.1f} min, {stats.tokens_seen:,} tokens | "
          f"train loss {stats.train_loss:.4f} | val loss {stats.val_loss:.4f}", flush=True)

    samples = {p: sample(model, tokenizer, p) for p in ("Return the", "这是一个关于")}
    for prompt, text in samples.items():
        print(f"sample [{prompt}]: {text!r}", flush=True)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # name the class every transformers release knows (5.x writes its new "TokenizersBackend")
    cfg_path = Path(out) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    corpus_info = {
        "files": n_files, "docs": len(docs), "chars": sum(map(len, docs)), "val_docs": len(val_docs),
        "train_tokens": train_data.numel(), "val_tokens": val_data.numel(), "min_chars": args.min_chars,
        "seed": args.seed, "lr": args.lr, "weight_decay": args.weight_decay, "batch_size": args.batch_size,
    }
    write_model_card(out, config, n_params, stats, corpus_info, samples, command, args.seq_len)
    # the held-out docstrings as text (each followed by EOT, as the model saw them): the quality tests'
    # validation text (the bfloat16 perplexity is checked against float32's on it)
    (out / "validation.txt").write_text("".join(d + EOT for d in val_docs), encoding="utf-8")
    (out / "training_summary.json").write_text(
        json.dumps({**corpus_info, "params": n_params, "steps": stats.steps, "minutes": stats.seconds / 60,
                    "tokens_seen": stats.tokens_seen, "train_loss": stats.train_loss,
                    "val_loss": stats.val_loss, "command": command}, indent=2) + "\n",
        encoding="utf-8",
    )
    size_mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6
    print(f"saved to {out} ({size_mb:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
