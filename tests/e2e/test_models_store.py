"""Models in the store through a real kernel: `llmos model import|ls|export|rm` as a user runs them, a model run by
name straight from the store (greedy output identical to its directory's), and who may import."""

import hashlib
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from llmos import LLMOS, Busy, NotFound, NotPermitted
from llmos import store_models as sm
from llmos.client import Client

BIN = [sys.executable, "-m", "llmos"]


def llmos(kernel, *args, env=None, timeout=120):
    return subprocess.run([*BIN, *args], env=env or kernel.env, capture_output=True, text=True, timeout=timeout)


def unique() -> str:
    return f"m{uuid.uuid4().hex[:10]}"  # the shared kernel's store outlives a test: never reuse a name


@pytest.fixture
def stored(kernel, client, tiny_model):
    """The tiny model imported under a name of its own (by the CLI, as the admin); unloaded and removed after."""
    name = unique()
    r = llmos(kernel, "model", "import", tiny_model, "--name", name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"imported {name}: ") and f"llmos run --model {name}" in r.stdout
    yield name
    for model in (name, f"store:/models/{name}"):
        try:
            client.model_unload(model, force=True)
        except NotFound:
            pass
    if client.fs.exists(f"/models/{name}"):
        client.fs.rm(f"/models/{name}", recursive=True)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_model_imported_by_name_runs_greedy_identical_to_its_directory(kernel, client, tiny_model, stored):
    prompt = "The kernel runs"
    a = client.wait(client.spawn(prompt, model=stored, temperature=0, max_new_tokens=24, ignore_eos=True))
    b = client.wait(client.spawn(prompt, model=tiny_model, temperature=0, max_new_tokens=24, ignore_eos=True))
    assert a.finish_reason == "length" and a.token_ids == b.token_ids and len(a.token_ids) == 24
    r = llmos(kernel, "run", "--model", stored, "--temperature", "0", "--max-new-tokens", "24", "--ignore-eos", prompt)
    assert r.returncode == 0 and r.stdout == a.text + "\n", r.stderr
    with LLMOS(model_path=stored, address=kernel.address) as os_:
        assert os_.generate_text(prompt, temperature=0, max_new_tokens=24, ignore_eos=True) == a.text
    # every spelling names the one instance: it is loaded once, from the store
    for spelling in (stored, f"/models/{stored}", f"store:/models/{stored}"):
        assert client.model_info(spelling)["model"] == f"store:/models/{stored}"
    assert client.model_load(f"/models/{stored}")["loaded"] is True


def test_ls_export_and_rm_as_a_user_runs_them(kernel, client, tiny_model, stored, tmp_path):
    src = sorted(sm.model_files(Path(tiny_model)))
    rows = {r["name"]: r for r in json.loads(llmos(kernel, "model", "ls", "--json").stdout)}
    row = rows[stored]
    assert row["files"] == len(src) and row["size"] == sum(p.stat().st_size for p in src)
    assert row["owner"] == client.user and row["complete"] is True and row["path"] == f"/models/{stored}"
    table = llmos(kernel, "model", "ls").stdout
    assert any(line.split()[0] == stored for line in table.splitlines()[1:])
    out = tmp_path / "exported"
    r = llmos(kernel, "model", "export", stored, str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src)
    assert all(sha(out / p.name) == sha(p) for p in src)  # byte-identical, every file
    again = llmos(kernel, "model", "export", stored, str(out))
    assert again.returncode == 1 and "already holds" in again.stderr and "--force" in again.stderr
    client.model_load(stored)  # a loaded store model's files are read in place by its worker: they stay
    busy = llmos(kernel, "model", "rm", stored)
    assert busy.returncode == 1 and "[EBUSY]" in busy.stderr and "unload it first" in busy.stderr
    with pytest.raises(Busy):
        client.fs.put(f"/models/{stored}/config.json", b"{}")
    assert client.wait(client.spawn("still runs", model=stored, max_new_tokens=2)).stats.output_tokens == 2
    client.model_unload(stored, force=True)
    r = llmos(kernel, "model", "rm", stored)
    assert r.returncode == 0 and r.stdout.startswith(f"removed {stored} ("), r.stderr
    assert stored not in {r["name"] for r in json.loads(llmos(kernel, "model", "ls", "--json").stdout)}
    with pytest.raises(NotFound, match=f"not a directory .*and in the store nothing is at /models/{stored}"):
        client.spawn("x", model=stored)
    gone = llmos(kernel, "model", "rm", stored)
    assert gone.returncode == 1 and "[ENOENT]" in gone.stderr


def test_an_import_over_a_name_in_use_is_ebusy_unless_replace(kernel, tiny_model, stored):
    r = llmos(kernel, "model", "import", tiny_model, "--name", stored)
    assert r.returncode == 1 and "[EBUSY]" in r.stderr and "--replace" in r.stderr
    r = llmos(kernel, "model", "import", tiny_model, "--name", stored, "--replace", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == stored, r.stderr


def test_only_the_admin_imports_and_removes_models(kernel, client, tiny_model, stored):
    name = unique()
    env = kernel.env_as("bob")  # the CLI is bob to the kernel (its CURVE key)
    r = llmos(kernel, "model", "import", tiny_model, "--name", name, env=env)
    assert r.returncode == 1 and "[EPERM]" in r.stderr and "only the admin writes /models" in r.stderr
    assert not client.fs.exists(f"/models/{name}")  # nothing of it was stored
    with kernel.client_as("bob") as bob:
        with pytest.raises(NotPermitted):
            sm.remove_model(bob, stored)
        assert any(r["name"] == stored for r in sm.list_models(bob))  # everyone reads /models


def test_a_broken_model_is_refused_before_anything_is_sent(kernel, client, tiny_model, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    raw = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(raw[:len(raw) // 2])  # cut: its tensors lie past the end
    name = unique()
    r = llmos(kernel, "model", "import", str(bad), "--name", name)
    assert r.returncode == 1 and "[EINVAL]" in r.stderr and "model.safetensors" in r.stderr
    assert not client.fs.exists(f"/models/{name}")


def test_the_shipped_default_model_is_importable(kernel, client):
    name = unique()
    r = llmos(kernel, "model", "import", "--default", "--name", name, "--json")
    try:
        assert r.returncode == 0, r.stderr
        row = json.loads(r.stdout)
        assert row["name"] == name and row["complete"] and row["size"] > 8_000_000
        ext = client.fs.stat(f"/models/{name}/model.safetensors").extents
        assert len(ext) > 30  # the header, then one extent per tensor (the default model has 4 layers of 9)
    finally:
        client.fs.rm(f"/models/{name}", recursive=True)


@pytest.mark.slow  # starts, loads or kills kernels for 6-25 s: the slow step of .ci/run
def test_an_interrupted_or_refused_replace_keeps_the_old_model_and_leaves_no_staging(kernel, client, tiny_model,
                                                                                     stored):
    before = {f.name: (f.size, f.mtime) for f in client.fs.ls(f"/models/{stored}")}
    client.fs.put(f"/models/.import-{stored}-0badc0de/config.json", b"{}")  # as a kill -9 leaves one

    class Interrupted(Exception):
        pass

    def interrupt(done, total):
        raise Interrupted()

    with pytest.raises(Interrupted):
        sm.import_model(client, tiny_model, stored, replace=True, progress=interrupt)
    assert {f.name: (f.size, f.mtime) for f in client.fs.ls(f"/models/{stored}")} == before
    assert not [e.name for e in client.fs.ls("/models") if e.name.startswith(f".import-{stored}-")]
    assert all(not r["name"].startswith(".") for r in sm.list_models(client))
    client.model_load(stored)
    r = llmos(kernel, "model", "import", tiny_model, "--name", stored, "--replace")
    assert r.returncode == 1 and "[EBUSY]" in r.stderr and "unload it first" in r.stderr
    assert {f.name: (f.size, f.mtime) for f in client.fs.ls(f"/models/{stored}")} == before
    assert not [e.name for e in client.fs.ls("/models") if e.name.startswith(f".import-{stored}-")]
    client.model_unload(stored, force=True)
    assert sm.import_model(client, tiny_model, stored, replace=True)["complete"] is True
