"""Importing a model into the store (llmos/store_models.py), the parts that need no kernel: which files go, the
checks before anything is sent, and the upload plan that gives every tensor an extent of its own."""

import json
import shutil
import struct

import pytest

from llmos.drivers.model.registry import DEFAULT_MODEL_DIR
from llmos.store_models import check_importable, model_files, pieces_for, plain_pieces, safetensors_pieces
from llmos.syscalls.errors import InvalidArgument, NotFound


def header_of(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return len(raw), n, json.loads(raw[8:8 + n])


def extents(pieces):
    """The extents a plan makes, as (start, end) byte ranges of the file."""
    out = []
    for p in pieces:
        if p.new_extent or not out:
            out.append([p.offset, p.offset + p.length])
        else:
            assert out[-1][1] == p.offset
            out[-1][1] += p.length
    return [tuple(e) for e in out]


@pytest.mark.parametrize("frame, max_extent", [(4 * 2**20, 2**30), (1000, 2**30), (333, 4096)])
def test_the_header_is_the_first_extent_and_every_tensor_starts_one(frame, max_extent):
    size, n, header = header_of(DEFAULT_MODEL_DIR / "model.safetensors")
    pieces = safetensors_pieces(size, n, header, frame, max_extent)
    assert all(0 < p.length <= frame for p in pieces)
    assert sum(p.length for p in pieces) == size and pieces[0].offset == 0
    ext = extents(pieces)
    assert ext[0] == (0, 8 + n) or (max_extent < 8 + n and ext[0][0] == 0)
    starts = {s for s, _ in ext}
    for key, meta in header.items():
        if key != "__metadata__":
            assert 8 + n + meta["data_offsets"][0] in starts, f"{key} does not start an extent"
            lo, hi = 8 + n + meta["data_offsets"][0], 8 + n + meta["data_offsets"][1]
            if hi - lo <= max_extent:  # it lies whole in the extent it starts
                assert any(s == lo and e >= hi for s, e in ext)
    assert all(e - s <= max_extent for s, e in ext)


def test_bytes_between_tensors_end_the_extent_before_them():
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [1], "data_offsets": [16, 20]}, "__metadata__": {}}
    raw = json.dumps(header).encode()
    size = 8 + len(raw) + 20
    assert extents(safetensors_pieces(size, len(raw), header)) == [(0, 8 + len(raw)), (8 + len(raw), 8 + len(raw) + 16),
                                                                   (8 + len(raw) + 16, size)]
    assert extents(plain_pieces(10, 4)) == [(0, 10)] and plain_pieces(0) == []


def test_the_files_that_go_skip_other_weight_formats_and_hidden_ones_with_config_last(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(DEFAULT_MODEL_DIR, d)
    for name in ("pytorch_model.bin", ".DS_Store", "zz.txt"):
        (d / name).write_bytes(b"x")
    (d / "sub").mkdir()
    names = [p.name for p in model_files(d)]
    assert names[-1] == "config.json" and "zz.txt" in names
    assert not {"pytorch_model.bin", ".DS_Store", "sub"} & set(names)
    assert pieces_for(d / "model.safetensors")[1].new_extent  # the first tensor starts an extent


def test_a_directory_that_cannot_load_is_refused_before_anything_is_sent(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(DEFAULT_MODEL_DIR, d)
    assert [p.name for p in check_importable(d)][-1] == "config.json"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00002.safetensors"}}))
    with pytest.raises(InvalidArgument, match="names shards that are not there: 'model-00002.safetensors'"):
        check_importable(d)
    (d / "model.safetensors.index.json").unlink()
    (d / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(InvalidArgument, match="'model.safetensors' is not a safetensors file"):
        check_importable(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(InvalidArgument, match="no \\*.safetensors weights"):
        check_importable(d)
    with pytest.raises(NotFound, match="expected a Hugging Face model directory"):
        check_importable(tmp_path / "nothing")
