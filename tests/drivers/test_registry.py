"""Model directories are checked before loading: a broken config.json or safetensors file is EINVAL naming it."""

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
