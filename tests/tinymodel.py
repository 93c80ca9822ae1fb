"""Tiny random-weight Hugging Face models for tests: real transformers classes, real tokenizer files.

Besides the random tiny Llama, this builds *chain* models (a Llama whose greedy next token depends
only on the current token, so a test scripts exactly what is generated), a tiny GPT-2 (the
sequential engine's path) and small tokenizers of the three decoder kinds: byte-level BPE,
SentencePiece-style Metaspace (also with byte fallback, as Llama-2) and WordPiece.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_VOCAB_WORDS = 400
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_tokenizer() -> Any:
    """Byte-level BPE with no merges: every byte is a token, so any text (Chinese too) round-trips and a
    multi-byte character spans tokens. Specials: <unk> 0, <s> 1, </s> 2, <|im_start|> 3, <|im_end|> 4."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


SPM_WORDS = ["▁The", "▁model", "▁runs", "▁the", "▁kernel", "▁Hello", "▁world", "▁I", "▁said", "'s", ",", "."]


def metaspace_tokenizer(llama2_decoder: bool = True) -> Any:
    """SentencePiece-style: words carry a leading "▁" that decodes to a space, dropped at the start of a
    text. ``llama2_decoder``: the Llama-2/Mistral fast tokenizer's decoder chain (Replace, ByteFallback,
    Fuse, Strip); else tokenizers' Metaspace decoder. Specials: <unk> 0, <s> 1, </s> 2; a BOS opens every
    encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *SPM_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    if llama2_decoder:
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", clean_up_tokenization_spaces=False)


def byte_fallback_tokenizer() -> Any:
    """Llama-2/Mistral-style: BPE over Metaspace words with SentencePiece byte fallback (a character outside
    the vocabulary becomes byte tokens ``<0x0A>``, ``<0xE4>``... that are ordinary tokens, not special ones)
    and the Llama-2 fast tokenizer's decoder chain, whose ByteFallback decodes each run of byte tokens at
    once (one invalid byte turns the whole run into U+FFFDs). Specials: <unk> 0, <s> 1, </s> 2; bytes 3-258."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    def shell(model):
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        return tok

    corpus = ["The model runs the kernel.", "Hello world, I said.", "The kernel's model runs the world."]
    trained = shell(models.BPE(unk_token="<unk>"))
    trained.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                                            show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = shell(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", clean_up_tokenization_spaces=False)


def wordpiece_tokenizer() -> Any:
    """BERT-style WordPiece: words joined by spaces, "##" pieces glued to the word before; [CLS] opens and
    [SEP] closes every encoded text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "the", "model", "run", "##s", "##ning", "kernel", "hello", "world",
             "un", "##believ", "##able", ".", ",", "'", "t", "don"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "[PAD]"])
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1),
                                                                                                ("[SEP]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", clean_up_tokenization_spaces=False)


def make_tiny_llama(path: Path, *, hidden: int = 32, layers: int = 2, heads: int = 4, context: int = 1024,
                    seed: int = 0, kv_heads: int | None = None) -> Path:
    """Write a tiny LlamaForCausalLM with a byte-level tokenizer and a ChatML template to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    fast = byte_level_tokenizer()
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      max_position_embeddings=context, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      tie_word_embeddings=True, initializer_range=0.3)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return path


def make_tiny_gpt2(path: Path, *, context: int = 256, seed: int = 0) -> Path:
    """Write a tiny GPT2LMHeadModel (not the Llama family: the sequential engine runs it) with the
    byte-level tokenizer to ``path``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path.mkdir(parents=True, exist_ok=True)
    fast = byte_level_tokenizer()
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(fast), n_positions=context, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                     eos_token_id=2, pad_token_id=2)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def make_chain_llama(path: Path, tokenizer: Any, chain: dict[int, int], *, hidden: int = 64,
                     context: int = 512) -> Path:
    """Write a Llama whose greedy next token is ``chain[current token]`` (for tokens in ``chain``).

    Attention and MLP outputs are zero (o_proj, down_proj), so the last hidden state is RMSNorm of
    the current token's embedding; chain tokens get one-hot embeddings on dimensions of their own, and
    the LM head maps each to logit 30 on its successor and exactly 0 on every other token. Greedy
    decoding (transformers' ``generate`` too) follows the chain; at most ``hidden`` chain tokens.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if len(chain) > hidden:
        raise ValueError(f"a chain of {len(chain)} tokens needs hidden >= {len(chain)}")
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    vocab = len(tokenizer)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=context,
                      tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        emb = torch.randn(vocab, hidden)
        head = torch.zeros(vocab, hidden)
        for dim, (tok, nxt) in enumerate(chain.items()):
            emb[tok] = 0.0
            emb[tok, dim] = 1.0
            head[nxt, dim] = 30.0  # RMSNorm of a one-hot row of size `hidden` is sqrt(hidden) on its dimension
        head /= hidden ** 0.5
        model.model.embed_tokens.weight.copy_(emb)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.copy_(head)
    model.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    return path
