"""Models loaded from the store (drivers/model/from_store.py): tensors are views of LMDB's map, the model is the
one from_pretrained gives (greedy output identical, tied weights, dtype, generation_config), and the names
and checks of models in the store. The model is written with the storage driver's own ops, following the
importer's plan (userland/store_models.py); no kernel."""

import json
import shutil
from pathlib import Path

import pytest

from llmos.drivers.model import from_store
from llmos.drivers.model.registry import DEFAULT_MODEL_DIR
from llmos.drivers.storage import FS, Store, ops, store_dir
from llmos.store_models import MAX_EXTENT, model_files, pieces_for, safetensors_pieces
from llmos.syscalls.errors import InvalidArgument, NotFound
from tests.tinymodel import make_tiny_llama


def put_model(home: Path, src: Path, name: str, files: list[Path] | None = None, max_extent: int = MAX_EXTENT) -> None:
    """Store ``src``'s files under /models/<name> as the importer does (one upload per file, its pieces)."""
    store = Store(store_dir(home)).open()
    try:
        for f in files if files is not None else model_files(src):
            upload = store.write_txn(lambda txn: ops.apply(ops.Begin(f"/models/{name}/{f.name}", "root"), txn, store))
            data = f.read_bytes()
            pieces = safetensors_pieces(*_header(f), max_extent=max_extent) if f.name.endswith(".safetensors") \
                else pieces_for(f)
            for p in pieces:
                piece = ops.Append(upload, data[p.offset:p.offset + p.length], p.new_extent)
                store.write_txn(lambda txn: ops.apply(piece, txn, store))
            store.write_txn(lambda txn: ops.apply(ops.Commit(upload), txn, store))
    finally:
        store.close()


@pytest.fixture
def home(tmp_path):
    yield tmp_path / "home"


@pytest.fixture
def tiny_dir(tmp_path):
    path = make_tiny_llama(tmp_path / "tiny", seed=5)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 4],
                                                              "pad_token_id": 2}))
    return path


def greedy(model, ids, n=24):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0].tolist()


def test_a_store_model_is_the_model_from_pretrained_gives_with_its_weights_in_the_map(home, tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM

    put_model(home, tiny_dir, "tiny")
    net, tok, dev = from_store.load_model(from_store.ref("tiny"), "cpu", home=home)
    try:
        ref = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
        hold = net._llmos_store
        assert hold.txn_cm is None  # the read ended with the load: no page of the store stays pinned by it
        lo, hi = hold.stats.map_range
        assert hi > lo > 0
        big = [(n, p) for n, p in net.named_parameters() if p.nbytes >= 4096]
        assert big and all(lo <= p.data_ptr() < hi for _, p in big), "a big tensor was copied out of the map"
        assert hold.stats.zero_copy >= len(big) and hold.stats.zero_copy_bytes >= sum(p.nbytes for _, p in big)
        assert net.lm_head.weight is net.model.embed_tokens.weight  # tied, as from_pretrained ties them
        assert all(p.dtype == torch.float32 for p in net.parameters())
        assert net.generation_config.eos_token_id == [2, 4] == ref.generation_config.eos_token_id
        ids = tok("The kernel runs the model.")["input_ids"]
        with torch.no_grad():
            assert torch.equal(net(torch.tensor([ids])).logits, ref(torch.tensor([ids])).logits)
        assert greedy(net, ids) == greedy(ref, ids)
        assert tok.chat_template  # the small files (tokenizer, template) came through the temporary directory
    finally:
        net._llmos_store.release()


def test_float16_weights_are_converted_to_float32_as_from_pretrained_does(home):
    import torch
    from transformers import AutoModelForCausalLM

    put_model(home, DEFAULT_MODEL_DIR, "default")
    net, tok, _ = from_store.load_model(from_store.ref("default"), "cpu", home=home)
    try:
        ref = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
        assert all(p.dtype == torch.float32 for p in net.parameters())
        assert net._llmos_store.stats.copied > 0  # stored as float16: converted, so copied
        ids = tok("Once upon a time")["input_ids"]
        assert greedy(net, ids, 16) == greedy(ref, ids, 16)
    finally:
        net._llmos_store.release()


def test_a_tensor_split_over_extents_is_copied_and_still_right(home, tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM

    put_model(home, tiny_dir, "split", max_extent=1024)  # every tensor over 1 KiB lies over several extents
    net, tok, _ = from_store.load_model(from_store.ref("split"), "cpu", home=home)
    try:
        ref = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
        assert net._llmos_store.stats.copied > 0
        ids = tok("split tensors")["input_ids"]
        assert greedy(net, ids) == greedy(ref, ids)
    finally:
        net._llmos_store.release()


def _header(f: Path):
    import struct

    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return len(raw), n, json.loads(raw[8:8 + n])


@pytest.mark.parametrize("model, name", [("tiny", "tiny"), ("/models/tiny", "tiny"), ("store:/models/tiny", "tiny"),
                                         ("/tmp/tiny", None), ("a/b", None), ("/models/a/b", None), ("", None),
                                         (".hidden", None), ("x" * 129, None)])
def test_the_model_strings_that_name_a_store_model(model, name):
    assert from_store.store_name(model) == name


def test_the_check_names_what_is_wrong_in_the_store(home, tiny_dir):
    put_model(home, tiny_dir, "ok")
    broken = tiny_dir.parent / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "config.json").write_text("{nope")
    put_model(home, broken, "badcfg")
    put_model(home, tiny_dir, "half", [f for f in model_files(tiny_dir) if f.name != "config.json"])
    store = Store(store_dir(home), readonly=True).open()
    try:
        fs = FS(store)
        assert "model.safetensors" in from_store.check_model(fs, "ok")
        assert from_store.parameter_count(fs, "ok") > 0
        with pytest.raises(InvalidArgument, match="config.json is not valid JSON"):
            from_store.check_model(fs, "badcfg")
        with pytest.raises(NotFound, match="has no config.json"):
            from_store.check_model(fs, "half")
        with pytest.raises(NotFound, match="nothing is at /models/nothing"):
            from_store.check_model(fs, "nothing")
    finally:
        store.close()


def test_a_name_resolves_to_the_store_a_directory_wins_and_enoent_names_both_places(home, tiny_dir, tmp_path):
    from llmos.drivers.model.estimate import estimate
    from llmos.drivers.model.registry import resolve_model

    put_model(home, tiny_dir, "tiny")
    store = Store(store_dir(home), readonly=True).open()
    try:
        fs = FS(store)
        for name in ("tiny", "/models/tiny", "store:/models/tiny"):
            assert resolve_model(name, fs) == "store:/models/tiny"
        assert resolve_model(str(tiny_dir), fs) == str(tiny_dir)
        assert resolve_model("default", fs) == str(DEFAULT_MODEL_DIR)
        with pytest.raises(NotFound, match=r"no model 'nothing': not a directory \(a model path must be absolute\), "
                                           r"and in the store nothing is at /models/nothing"):
            resolve_model("nothing", fs)
        with pytest.raises(NotFound, match="no such directory, and in the store nothing is at /models/gone"):
            resolve_model("/models/gone", fs)
        with pytest.raises(NotFound, match="expected a Hugging Face model directory"):  # today's message
            resolve_model(str(tmp_path / "absent"), fs)
        from_store.use_store(fs)  # as the kernel does: the estimate reads config and headers from the store
        try:
            assert estimate("store:/models/tiny", "cpu", 64) == estimate(str(tiny_dir), "cpu", 64)
            assert resolve_model("tiny") == "store:/models/tiny"
        finally:
            from_store.use_store(None)
    finally:
        store.close()
    with pytest.raises(NotFound, match="no store is open to look in"):
        resolve_model("tiny")
