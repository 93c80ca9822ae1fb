"""Data sets in the store through a real kernel: `llmos data import|ls|stat|cat|rm` as a user runs them, the layout
(records, index, meta.json), bad rows, owners, and an import whose memory does not grow with its file."""

import json
import struct
import subprocess
import sys
import uuid

import pytest

from llmos import Busy, InvalidArgument, NotFound, NotPermitted

BIN = [sys.executable, "-m", "llmos"]


def llmos(kernel, *args, env=None, timeout=120):
    return subprocess.run([*BIN, *args], env=env or kernel.env, capture_output=True, text=True, timeout=timeout)


def unique() -> str:
    return f"d{uuid.uuid4().hex[:10]}"


@pytest.fixture
def names(client):
    made: list[str] = []
    yield made
    for name in made:
        if client.fs.exists(f"/data/{name}"):
            client.fs.rm(f"/data/{name}", recursive=True)


def test_import_lays_out_records_index_and_meta_and_reads_slices(kernel, client, names, tmp_path):
    src = tmp_path / "corpus.jsonl"
    texts = [f"record {i}: héllo\nwörld" if i % 3 == 0 else f"record {i}" for i in range(50)]
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    name = unique()
    names.append(name)
    r = llmos(kernel, "data", "import", str(src), "--name", name, "--format", "jsonl")
    assert r.returncode == 0 and r.stdout.strip() == f"imported {name}: 50 records, " \
        f"{sum(len(t.encode()) for t in texts)} B from corpus.jsonl", r.stderr
    blob = client.fs.get(f"/data/{name}/records")
    index = struct.unpack("<51Q", client.fs.get(f"/data/{name}/index"))
    assert [blob[index[i]:index[i + 1]].decode() for i in range(50)] == texts and index[0] == 0
    meta = json.loads(client.fs.get(f"/data/{name}/meta.json"))
    assert meta["format"] == "jsonl" and meta["records"] == 50 and meta["bytes"] == len(blob)
    assert meta["source"] == "corpus.jsonl" and meta["created"] > 0
    assert client.data.records(name, 3, 4) == texts[3:7] and client.data.records(name, 48, 10) == texts[48:]
    assert client.data.records(name, 60) == [] and list(client.data.iter(name, batch=7)) == texts
    cat = llmos(kernel, "data", "cat", name, "--start", "1", "--count", "2")
    assert cat.returncode == 0 and cat.stdout == texts[1] + "\n" + texts[2] + "\n"
    rows = [json.loads(line) for line in llmos(kernel, "data", "cat", name, "--start", "3", "--count", "1",
                                               "--json").stdout.splitlines()]
    assert rows == [{"i": 3, "text": texts[3]}]
    st = json.loads(llmos(kernel, "data", "stat", name, "--json").stdout)
    assert st["records"] == 50 and st["owner"] == client.user
    assert any(row["name"] == name and row["records"] == 50 for row in json.loads(
        llmos(kernel, "data", "ls", "--json").stdout))
    rm = llmos(kernel, "data", "rm", name)
    assert rm.returncode == 0 and not client.fs.exists(f"/data/{name}")


def test_a_bad_row_stops_the_import_naming_its_line_and_leaves_nothing(kernel, client, names, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n{"body": "c"}\n')
    name = unique()
    names.append(name)
    r = llmos(kernel, "data", "import", str(src), "--name", name, "--format", "jsonl")
    assert r.returncode == 1 and "[EINVAL]" in r.stderr and "bad.jsonl: line 3: invalid JSON" in r.stderr
    assert not client.fs.exists(f"/data/{name}")
    r = llmos(kernel, "data", "import", str(src), "--name", name, "--format", "jsonl", "--skip-bad", "--json")
    assert r.returncode == 0, r.stderr
    meta = json.loads(r.stdout)
    assert meta["records"] == 2 and meta["skipped"] == 2 and meta["skipped_lines"] == [3, 4]
    missing = llmos(kernel, "data", "import", str(tmp_path / "nope.txt"), "--name", unique())
    assert missing.returncode == 1 and "No such file" in missing.stderr


def test_csv_and_paragraphs_and_a_taken_name(kernel, client, names, tmp_path):
    src = tmp_path / "t.csv"
    src.write_text('id,body\n1,"first, with a comma"\n2,second\n')
    name = unique()
    names.append(name)
    meta = client.data.import_file(src, name, "csv", "body")
    assert meta["records"] == 2 and client.data.records(name) == ["first, with a comma", "second"]
    with pytest.raises(Busy, match="--replace"):
        client.data.import_file(src, name, "csv", "body")
    para = tmp_path / "p.txt"
    para.write_text("one\ntwo\n\nthree\n")
    client.data.import_file(para, name, paragraphs=True, replace=True)
    assert client.data.records(name) == ["one\ntwo", "three"]
    with pytest.raises(InvalidArgument):
        client.data.records(name, -1)


def test_anyone_creates_only_the_owner_or_the_admin_removes(kernel, client, names, tmp_path):
    src = tmp_path / "x.txt"
    src.write_text("a\nb\n")
    name = unique()
    names.append(name)
    # two users other than the admin, each with its own CURVE key over tcp
    with kernel.client_as(f"u{uuid.uuid4().hex[:8]}") as alice, kernel.client_as(f"u{uuid.uuid4().hex[:8]}") as bob:
        alice.data.import_file(src, name)
        assert bob.data.records(name) == ["a", "b"] and bob.data.stat(name)["owner"] == alice.user
        with pytest.raises(NotPermitted):
            bob.data.rm(name)
        with pytest.raises(NotPermitted):
            bob.data.import_file(src, name, replace=True)
        assert alice.data.rm(name) == 3
        with pytest.raises(NotFound):
            alice.data.stat(name)


# the CLI in a child that reports its own peak RSS (VmHWM is the process's since its exec; ru_maxrss would carry
# the forking test process's)
PEAK = ("import sys\nfrom llmos.cli import main\nrc = main(sys.argv[1:])\n"
        "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\nsys.exit(rc)\n")


def test_the_importers_memory_does_not_grow_with_the_file(kernel, client, names, tmp_path):
    """A file five times bigger costs the importer (peak RSS) less than half of the extra bytes: it streams."""
    peaks = []
    line = "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt\n"
    for mib in (5, 25):
        src = tmp_path / f"{mib}.txt"
        n = mib * 2**20 // (len(line) + 7)
        with open(src, "w") as fh:
            for i in range(n):
                fh.write(f"{i:06d} {line}")
        name = unique()
        names.append(name)
        r = subprocess.run([sys.executable, "-c", PEAK, "data", "import", str(src), "--name", name], env=kernel.env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        peaks.append(int(r.stdout.split()[-1]) / 1024)
        assert client.data.count(name) == n
    assert peaks[1] - peaks[0] < 10, f"peak RSS {peaks[0]:.1f} MiB for 5 MiB, {peaks[1]:.1f} MiB for 25 MiB"


def _staging_dirs(client, name):
    return [e.name for e in client.fs.ls("/data") if e.name.startswith(f".import-{name}-")]


def test_a_replace_that_fails_or_is_interrupted_keeps_the_old_set_and_leaves_no_staging(kernel, client, names,
                                                                                        tmp_path):
    name = unique()
    names.append(name)
    good = tmp_path / "good.txt"
    good.write_text("old 1\nold 2\n")
    client.data.import_file(good, name)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "new"}\nnot json\n')
    r = llmos(kernel, "data", "import", str(bad), "--name", name, "--format", "jsonl", "--replace")
    assert r.returncode == 1 and "line 2: invalid JSON" in r.stderr
    assert client.data.records(name) == ["old 1", "old 2"] and not _staging_dirs(client, name)

    class Interrupted(Exception):
        pass

    def interrupt(done, total):  # after the first frame went: the new set is half written
        raise Interrupted()

    big = tmp_path / "big.txt"
    big.write_text("".join(f"new line {i} {'x' * 200}\n" for i in range(30_000)))  # > one 4 MiB frame
    with pytest.raises(Interrupted):
        client.data.import_file(big, name, replace=True, progress=interrupt)
    assert client.data.records(name) == ["old 1", "old 2"] and not _staging_dirs(client, name)
    assert client.data.import_file(big, name, replace=True)["records"] == 30_000
    assert client.data.count(name) == 30_000 and not _staging_dirs(client, name)


def test_a_staging_dir_left_by_a_killed_import_is_hidden_and_removed_by_the_next_import(kernel, client, names,
                                                                                        tmp_path):
    name = unique()
    names.append(name)
    client.fs.put(f"/data/.import-{name}-0badc0de/records", b"half")
    assert all(not row["name"].startswith(".") for row in client.data.ls())
    src = tmp_path / "x.txt"
    src.write_text("a\n")
    client.data.import_file(src, name)
    assert not _staging_dirs(client, name) and client.data.records(name) == ["a"]


def test_every_row_bad_is_an_error_and_stores_nothing(kernel, client, names, tmp_path):
    name = unique()
    names.append(name)
    src = tmp_path / "all-bad.txt"
    src.write_bytes(b"\xff\n\xfe\n")
    r = llmos(kernel, "data", "import", str(src), "--name", name, "--skip-bad")
    assert r.returncode == 1 and "[EINVAL]" in r.stderr and "every row is bad (2 skipped" in r.stderr, r.stderr
    assert not client.fs.exists(f"/data/{name}") and not _staging_dirs(client, name)


@pytest.mark.parametrize("meta", [b"not json", b"[1, 2]", b'{"format": "text"}'])
def test_a_bad_meta_json_is_marked_in_ls_and_einval_in_stat(kernel, client, names, meta):
    name = unique()
    names.append(name)
    client.fs.put(f"/data/{name}/meta.json", meta)
    ls = llmos(kernel, "data", "ls")
    assert ls.returncode == 0, ls.stderr
    assert [line for line in ls.stdout.splitlines() if line.startswith(name)][0].endswith("(unreadable meta.json)")
    st = llmos(kernel, "data", "stat", name)
    assert st.returncode == 1 and "[EINVAL]" in st.stderr and "unreadable meta.json" in st.stderr
    assert "Traceback" not in st.stderr + ls.stderr
    with pytest.raises(InvalidArgument, match="unreadable meta.json"):
        client.data.stat(name)
