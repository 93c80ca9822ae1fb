"""Tiny random-weight Hugging Face models for tests: real transformers classes, real tokenizer files."""

from __future__ import annotations

from pathlib import Path

TINY_VOCAB_WORDS = 400


def make_tiny_llama(path: Path, *, hidden: int = 32, layers: int = 2, heads: int = 4, context: int = 1024,
                    seed: int = 0, kv_heads: int | None = None) -> Path:
    """Write a tiny LlamaForCausalLM with a word-level tokenizer and a ChatML template to ``path``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    # byte-level BPE with no merges: every byte is a token, so any text (Chinese too) round-trips
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      max_position_embeddings=context, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      tie_word_embeddings=True, initializer_range=0.3)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return path
