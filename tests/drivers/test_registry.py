"""Model directories are checked before loading: a path the OS refuses, a broken config.json (or a model shape out
of range), no tokenizer files, or a broken safetensors file is EINVAL (or ENOENT) naming it."""

import json
import shutil
import struct

import pytest

from llmos.drivers.model.registry import DEFAULT_MODEL_DIR, check_model_dir, resolve_model
from llmos.syscalls.errors import InvalidArgument, NotFound


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "m"
    shutil.copytree(DEFAULT_MODEL_DIR, path)
    return path


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_the_default_model_and_a_copy_of_it_pass(model_dir):
    assert resolve_model("default") == str(DEFAULT_MODEL_DIR)
    assert resolve_model(str(model_dir)) == str(model_dir)


@pytest.mark.parametrize("content, fault", [
    (b"{not json", "config.json is not valid JSON"),
    (b"\xff\xfe garbage", "config.json is not valid JSON"),
    (b"[1, 2, 3]", "config.json must hold a JSON object"),
    (b"", "config.json is not valid JSON"),
])
def test_a_config_that_is_not_a_json_object_is_einval_naming_the_file(model_dir, content, fault):
    (model_dir / "config.json").write_bytes(content)
    with pytest.raises(InvalidArgument, match=fault):
        resolve_model(str(model_dir))


TENSOR = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize("content, fault", [
    (b"\x00\x01", "too short for a header"),
    (struct.pack("<Q", 2**40) + b"{}", "its header claims"),
    (struct.pack("<Q", 5) + b"nope!", "header is not valid JSON"),
    (safetensors_bytes([1]), "must be a JSON object"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8), "outside"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}, b"\0" * 16), "needs 24"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": "big", "data_offsets": [0, 16]}}, b"\0" * 16), "shape"),
    (safetensors_bytes({"w": {"shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16), "no dtype"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16]}}, b"\0" * 16), "data_offsets"),
])
def test_a_malformed_safetensors_file_is_einval_naming_the_file_and_the_fault(model_dir, content, fault):
    (model_dir / "model.safetensors").write_bytes(content)
    with pytest.raises(InvalidArgument, match=fault) as err:
        resolve_model(str(model_dir))
    assert "model.safetensors" in err.value.message


def test_a_file_fixed_after_a_failed_check_passes_and_a_missing_directory_is_enoent(model_dir, tmp_path):
    good = (model_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").write_bytes(safetensors_bytes({"w": TENSOR}, b"\0" * 16))
    check_model_dir(model_dir)  # well formed (it is not this model's weights: the loader says so)
    (model_dir / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(InvalidArgument):
        check_model_dir(model_dir)
    (model_dir / "model.safetensors").write_bytes(good)
    check_model_dir(model_dir)
    with pytest.raises(NotFound):
        resolve_model(str(tmp_path / "nothing"))


@pytest.mark.parametrize("model, error, fault", [
    ("/" + "a" * 300, InvalidArgument, "File name too long"),  # a component over 255 bytes
    ("/tmp/" + "b" * 300 + "/m", InvalidArgument, "File name too long"),
    ("/" + "c/" * 2100, InvalidArgument, "File name too long"),  # the whole path over 4096 bytes
    ("~no_such_user_of_llmos/" + "d" * 300, NotFound, "no such user's home"),
    ("/tmp/nul\x00" + "e" * 300, NotFound, "no model at"),
    ("relative/" + "f" * 300, NotFound, "absolute path"),
])
def test_a_model_path_the_os_refuses_is_einval_or_enoent_quoting_only_a_short_prefix(model, error, fault):
    with pytest.raises(error, match=fault) as err:
        resolve_model(model)
    assert len(err.value.message) < 250 and f"({len(model)} characters)" in err.value.message


def write_config(model_dir, **changes):
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, fault", [
    ({"n_positions": -5}, "n_positions is -5"),  # transformers: "negative dimension" at load
    ({"max_position_embeddings": 0}, "max_position_embeddings is 0"),
    ({"n_embd": 10**12}, "n_embd is 1000000000000"),  # the estimate would overflow MessagePack's ints
    ({"num_hidden_layers": 10**6}, "num_hidden_layers is 1000000"),
    ({"num_attention_heads": "4"}, "num_attention_heads is '4'"),
    ({"num_key_value_heads": 2.5}, "num_key_value_heads is 2.5"),
    ({"vocab_size": True}, "vocab_size is True"),
    ({"intermediate_size": -1}, "intermediate_size is -1"),
    ({"text_config": {"num_hidden_layers": -2}}, "text_config.num_hidden_layers is -2"),
])
def test_a_model_shape_out_of_range_in_config_json_is_einval_naming_the_key(model_dir, changes, fault):
    write_config(model_dir, **changes)
    with pytest.raises(InvalidArgument, match=f"config.json: {fault}; it must be a whole number from 1 to"):
        resolve_model(str(model_dir))


def test_an_infinite_or_null_size_is_told_apart(model_dir):
    text = (model_dir / "config.json").read_text()
    (model_dir / "config.json").write_text(text.replace('"hidden_size":', '"hidden_size": 1e400, "x":'))
    with pytest.raises(InvalidArgument, match="hidden_size is inf"):
        resolve_model(str(model_dir))
    write_config(model_dir, hidden_size=64, head_dim=None, max_position_embeddings=2048.0)  # null: not stated
    resolve_model(str(model_dir))


@pytest.mark.parametrize("remove, add", [(["tokenizer.json"], {}), (["tokenizer.json", "tokenizer_config.json"], {}),
                                         (["tokenizer.json"], {"vocab.json": "{}"})])  # vocab.json needs merges.txt
def test_a_model_directory_without_a_tokenizers_files_is_einval(model_dir, remove, add):
    for name in remove:
        (model_dir / name).unlink()
    for name, text in add.items():
        (model_dir / name).write_text(text)
    with pytest.raises(InvalidArgument, match="no tokenizer files"):
        resolve_model(str(model_dir))
    (model_dir / "merges.txt").write_text("#version: 0.2\n")
    if "vocab.json" in add:
        resolve_model(str(model_dir))  # present: whether they make a tokenizer is the worker's check
