"""Context length and KV shape from every common config spelling, checked against the caches real models build."""

import pytest
import torch

from llmos.drivers.model.estimate import estimate
from llmos.drivers.model.shape import DEFAULT_CONTEXT, model_shape


def configs():
    import transformers as T

    return {
        "gpt2": (T.GPT2Config(vocab_size=64, n_positions=256, n_embd=32, n_layer=2, n_head=4), 256),
        "llama-gqa": (T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=300), 300),
        "falcon-multi-query": (T.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, max_position_embeddings=128), 128),
        "gpt-bigcode": (T.GPTBigCodeConfig(vocab_size=64, n_positions=96, n_embd=32, n_layer=2, n_head=4), 96),
        "mpt": (T.MptConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=2, max_seq_len=100), 100),
        "gemma2-head-dim": (T.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           max_position_embeddings=99), 99),
    }


def cache_bytes_per_token(config) -> int:
    """What the model's own cache holds per token, after a 3-token forward (float32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.inference_mode():
        cache = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True).past_key_values
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)) // 3


@pytest.mark.parametrize("name", list(configs()))
def test_context_and_kv_bytes_match_the_models_own_cache_for_every_spelling(name):
    config, context = configs()[name]
    shape = model_shape(config)
    assert shape.context_len == context
    assert shape.kv_bytes_per_token(4) == cache_bytes_per_token(config) > 0
    assert model_shape(config.to_dict()) == shape  # config.json's dict and the loaded config agree


def test_a_language_model_nested_under_text_config_is_read_from_there():
    import transformers as T

    text = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=640)
    outer = T.LlavaConfig(text_config=text.to_dict()).to_dict()
    assert model_shape(outer) == model_shape(text) and model_shape(outer).kv_heads == 1


def test_chatglm_and_qwen_style_spellings_and_a_config_without_a_context():
    chatglm = {"num_layers": 28, "hidden_size": 4096, "num_attention_heads": 32, "kv_channels": 128,
               "multi_query_attention": True, "multi_query_group_num": 2, "seq_length": 32768}
    s = model_shape(chatglm)
    assert (s.context_len, s.layers, s.kv_heads, s.head_dim) == (32768, 28, 2, 128)
    bloom = {"n_layer": 2, "hidden_size": 64, "n_head": 8}
    assert model_shape(bloom).context_len == DEFAULT_CONTEXT and model_shape(bloom).kv_bytes_per_token(2) == 2 * 2 * 64 * 2


def test_model_info_before_loading_reads_a_gpt2_config(tmp_path):
    from tests.tinymodel import make_tiny_gpt2

    path = make_tiny_gpt2(tmp_path / "g", context=256)
    est = estimate(path, "cpu", kv_tokens=None, max_batch=2)
    assert est["context_len"] == 256 and est["kv_bytes_per_token"] == 2 * 2 * 32 * 4
    assert est["kv_bytes"] == 2 * 256 * est["kv_bytes_per_token"] > 0


def test_the_kernel_estimates_and_checks_a_model_without_importing_torch():
    # the kernel's event loop calls these on model_info, model_load and the first spawn: importing torch
    # there froze every client for seconds
    import subprocess
    import sys

    code = ("import sys\n"
            "from llmos.kernel.kernel import Kernel\n"
            "from llmos.drivers.model.estimate import estimate\n"
            "from llmos.drivers.model.registry import resolve_model\n"
            "estimate(resolve_model(None), 'cpu')\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_an_estimate_past_what_a_64_bit_integer_holds_is_einval_naming_the_model(tmp_path):
    import json

    from llmos.syscalls.errors import InvalidArgument

    # every size in range on its own (registry.SHAPE_BOUNDS), together ~2**70 bytes of KV cache
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 60_000, "n_embd": 2**20, "n_head": 1,
                                                      "n_positions": 2**31}))
    with pytest.raises(InvalidArgument, match=r"config\.json gives \d+ bytes of KV cache per token .* 2\*\*63"):
        estimate(tmp_path, "cpu", kv_tokens=None, max_batch=64)
    assert estimate(tmp_path, "cpu", kv_tokens=8)["kv_bytes"] == 8 * 2 * 60_000 * 2**20 * 4 < 2**63
