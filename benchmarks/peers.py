"""The engines a user would pick instead of LLMOS, on the benchmark's own requests: ``benchmarks.run --peers``.

- llama.cpp's server, built once from the llama.cpp source vendored in the ``llama-cpp-python`` sdist and
  cached under ``~/.cache/llmos/peers/`` (keyed by the sdist's version, the machine and its CPU flags:
  ``-DGGML_NATIVE=ON`` compiles for this CPU); the model converted by that source's own
  ``convert_hf_to_gguf.py`` to f32, bf16 and q8_0; 32 slots with continuous batching, all requests sent
  at once over HTTP as token ids.
- CTranslate2 from PyPI (``pip install -e .[peers]``), its ``TransformersConverter``, the requests in one
  ``generate_batch`` in float32 and in the reduced compute types this CPU supports.

Every peer is measured by :func:`run_peers`, which never raises: a peer that cannot be built, converted or
run here comes back as a row with its ``error`` (the reason), so the rest of the benchmark goes on.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.workload import Request

CACHE = Path(os.environ.get("LLMOS_PEERS_CACHE", Path.home() / ".cache" / "llmos" / "peers"))
SDIST = "llama-cpp-python"
GGUF_TYPES = ("f32", "bf16", "q8_0")
# the converter hashes the tokenizer's pre-tokenizer output to name it in the GGUF; our models' byte-level
# BPE (GPT-2's regex, drivers/models/default) is not in its list. The requests are token ids, so the name
# only matters to llama.cpp's own text tokenisation, which the benchmark never uses.
PRE_TOKENIZER_FALLBACK = "gpt-2"


def cpu_flags() -> list[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return sorted(line.split(":", 1)[1].split())
    except OSError:
        pass
    return []


def cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _log(msg: str) -> None:
    print(f"  [peers] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- llama.cpp


def llama_source(cache: Path | None = None) -> tuple[Path, str]:
    """(the vendored llama.cpp directory, the sdist's version), downloading and unpacking the newest
    ``llama-cpp-python`` sdist with pip once. Raises RuntimeError when pip cannot fetch it."""
    src = (cache or CACHE) / "src"
    sdists = sorted(src.glob("llama_cpp_python-*.tar.gz")) if src.exists() else []
    if not sdists:
        src.mkdir(parents=True, exist_ok=True)
        _log(f"downloading the {SDIST} sdist with pip")
        r = subprocess.run([sys.executable, "-m", "pip", "download", SDIST, "--no-binary", ":all:", "--no-deps",
                            "-d", str(src)], capture_output=True, text=True, timeout=900)
        sdists = sorted(src.glob("llama_cpp_python-*.tar.gz"))
        if r.returncode or not sdists:
            raise RuntimeError(f"pip download {SDIST} failed: {(r.stderr or r.stdout).strip()[-300:]}")
    sdist = sdists[-1]
    version = sdist.name[len("llama_cpp_python-"):-len(".tar.gz")]
    return sdist, version


def llama_dir(cache: Path | None = None) -> tuple[Path, str]:
    """(the cache directory for this sdist version on this CPU, version); unpacks the sdist there."""
    cache = cache or CACHE
    sdist, version = llama_source(cache)
    key = f"llama.cpp-{version}-{platform.machine()}-{hashlib.sha1(' '.join(cpu_flags()).encode()).hexdigest()[:10]}"
    d = cache / key
    vendor = d / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not vendor.exists():
        d.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tf:
            tf.extractall(d, filter="data")
    return d, version


def llama_server(cache: Path | None = None, jobs: int = 2) -> tuple[Path, Path, str]:
    """(llama-server binary, vendored llama.cpp source, version), building the server once (CMake,
    ``-DGGML_NATIVE=ON -DLLAMA_CURL=OFF``, target llama-server; ~30-40 min on 2 cores) and reusing it after.
    Raises RuntimeError with the build log's tail when the build fails."""
    d, version = llama_dir(cache)
    vendor = d / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    binary = d / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary, vendor, version
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"cannot build llama.cpp: no {tool} on PATH")
    _log(f"building llama-server {version} in {d} (once; takes a while)")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    log = d / "build.log"
    with open(log, "w") as f:
        for cmd in (["cmake", "-S", str(vendor), "-B", str(d / "build"), *gen, "-DCMAKE_BUILD_TYPE=Release",
                     "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                     "-DLLAMA_OPENSSL=OFF"],
                    ["cmake", "--build", str(d / "build"), "--target", "llama-server", f"-j{jobs}"]):
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
                raise RuntimeError(f"llama.cpp build failed ({' '.join(cmd[:2])}): "
                                   + log.read_text()[-400:].replace("\n", " "))
    if not binary.exists():
        raise RuntimeError(f"llama.cpp build made no {binary}")
    return binary, vendor, version


def converter_libs(cache: Path | None = None) -> Path:
    """A directory with what the converter imports beyond the venv (sentencepiece), installed there once by
    ``pip install --target``: kept out of the venv because transformers imports sentencepiece whenever it is
    installed, and its wheel brings a second OpenMP runtime into every LLMOS worker."""
    d = (cache or CACHE) / "converter-libs"
    if not (d / "sentencepiece").exists():
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(d),
                            "sentencepiece>=0.1.98,<0.3"], capture_output=True, text=True, timeout=900)
        if r.returncode:
            raise RuntimeError(f"pip install sentencepiece (for convert_hf_to_gguf.py) failed: {r.stderr[-300:]}")
    return d


def convert_gguf(vendor: Path, model: Path, outtype: str, out: Path) -> tuple[Path, str]:
    """(the GGUF file, a note) of the HF model directory ``model`` in ``outtype`` (f32, bf16, q8_0...) by the
    vendored ``convert_hf_to_gguf.py`` with its vendored gguf-py. When the converter does not recognise the
    tokenizer's pre-tokenizer it is named :data:`PRE_TOKENIZER_FALLBACK` (the note says so).
    Raises RuntimeError with the converter's last lines."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # the converter is run unmodified; only the pre-tokenizer lookup falls back instead of refusing
    wrapper = (
        "import runpy, sys\n"
        f"sys.path[:0] = [{str(vendor)!r}, {str(vendor / 'gguf-py')!r}]\n"
        "import conversion.base as base\n"
        "orig = base.TextModel.get_vocab_base_pre\n"
        "def pre(self, tokenizer):\n"
        "    try:\n"
        "        return orig(self, tokenizer)\n"
        "    except NotImplementedError:\n"
        f"        print('LLMOS-PRE-FALLBACK', file=sys.stderr)\n"
        f"        return {PRE_TOKENIZER_FALLBACK!r}\n"
        "base.TextModel.get_vocab_base_pre = pre\n"
        f"sys.argv = ['convert_hf_to_gguf.py', {str(model)!r}, '--outtype', {outtype!r}, '--outfile', {str(out)!r}]\n"
        f"runpy.run_path({str(vendor / 'convert_hf_to_gguf.py')!r}, run_name='__main__')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(vendor / "gguf-py"), str(converter_libs())]),
           "NO_LOCAL_GGUF": "1"}
    r = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode or not out.exists():
        raise RuntimeError(f"convert_hf_to_gguf.py --outtype {outtype} failed: "
                           + " ".join((r.stderr or r.stdout).strip().splitlines()[-2:])[-300:])
    note = f"pre-tokenizer named {PRE_TOKENIZER_FALLBACK!r} (not in the converter's list)" \
        if "LLMOS-PRE-FALLBACK" in r.stderr else ""
    return out, note


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, path: str, body: dict, timeout: float = 1800.0) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"llama-server {path}: HTTP {resp.status} {data[:200]!r}")
        return json.loads(data)
    finally:
        conn.close()


def _wait_healthy(port: int, proc: subprocess.Popen, log: Path, deadline_s: float = 300.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited ({proc.returncode}): "
                               + " ".join(log.read_text(errors="replace").strip().splitlines()[-3:])[-300:])
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
            if ok:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"llama-server did not become healthy in {deadline_s:.0f} s")


def llama_workload(port: int, reqs: list[Request]) -> tuple[float, list[dict]]:
    """(wall seconds, responses) of every request sent at once to ``/completion``: prompt as token ids,
    greedy, EOS ignored, no prompt cache reuse."""
    def one(r: Request) -> dict:
        return _post(port, "/completion", {"prompt": r.prompt_ids, "n_predict": r.max_new_tokens, "ignore_eos": True,
                                           "temperature": 0.0, "top_k": 1, "cache_prompt": False,
                                           "return_tokens": True, "stream": False})

    with ThreadPoolExecutor(len(reqs)) as pool:
        t = time.perf_counter()
        out = list(pool.map(one, reqs))
        return time.perf_counter() - t, out


def run_llama(binary: Path, gguf: Path, reqs: list[Request], context: int, repeats: int) -> dict:
    """One llama-server on ``gguf`` with 32 slots, continuous batching, 32 x ``context`` tokens of KV and
    threads = cores: an untimed warm-up (two requests, 4 tokens), then ``repeats`` timed passes. Returns
    {tok_s (median), runs, ttft_p50_s, tokens, outputs, flags}."""
    port, slots, threads = _free_port(), 32, cores()
    flags = ["-np", str(slots), "-c", str(slots * context), "-t", str(threads), "-tb", str(threads), "-cb",
             "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True).stdout
    if "--cache-ram" in help_text:
        flags += ["--cache-ram", "0"]  # no host-memory prompt cache: every pass prefills again
    if "--no-webui" not in help_text:
        flags.remove("--no-webui")
    log = gguf.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.Popen([str(binary), "-m", str(gguf), *flags], stdout=f, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(port, proc, log)
        llama_workload(port, [Request(r.prompt_ids, 4) for r in reqs[:2]])  # warm-up, untimed
        dts, outs = [], []
        for _ in range(repeats):
            dt, outs = llama_workload(port, reqs)
            dts.append(dt)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    got = [len(o.get("tokens") or []) or int(o.get("tokens_predicted", 0)) for o in outs]
    useful = sum(min(g, r.max_new_tokens) for g, r in zip(got, reqs))
    if useful < sum(r.max_new_tokens for r in reqs):
        raise RuntimeError(f"llama-server produced {useful} of {sum(r.max_new_tokens for r in reqs)} tokens")
    ttfts = sorted(float(o.get("timings", {}).get("prompt_ms", 0.0)) / 1000 for o in outs)
    dt = sorted(dts)[len(dts) // 2]
    return {"tok_s": useful / dt, "runs": [round(useful / d) for d in dts], "tokens": useful,
            "prefill_p50_s": ttfts[len(ttfts) // 2], "outputs": [o.get("tokens") or [] for o in outs],
            "flags": " ".join(flags[:flags.index("--host")] + flags[flags.index("--port") + 2:])}


def llama_rows(model: Path, reqs: list[Request], context: int, repeats: int, work: Path,
               types: tuple[str, ...] = GGUF_TYPES) -> list[dict]:
    """A row per GGUF type: {peer, dtype, tok_s, ... } or {peer, dtype, error}."""
    try:
        binary, vendor, version = llama_server()
    except Exception as exc:  # noqa: BLE001 - a peer that cannot be built is a row, not a crash
        return [{"peer": "llama.cpp server", "dtype": t, "error": f"not built: {exc}"} for t in types]
    rows = []
    for t in types:
        row: dict[str, Any] = {"peer": f"llama.cpp server ({version})", "dtype": t}
        try:
            t0 = time.perf_counter()
            gguf, note = convert_gguf(vendor, model, t, work / f"{model.name}-{t}.gguf")
            row["convert_s"] = time.perf_counter() - t0
            row.update(run_llama(binary, gguf, reqs, context, repeats))
            row["note"] = note
            gguf.unlink(missing_ok=True)
            _log(f"llama.cpp {t}: {row['tok_s']:.0f} tok/s (runs {row['runs']})")
        except Exception as exc:  # noqa: BLE001
            row["error"] = str(exc)
            _log(f"llama.cpp {t}: {exc}")
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------------------- CTranslate2


def ct2_types() -> list[str]:
    """float32 and the best reduced compute type CTranslate2 supports on this CPU (bfloat16, then float16,
    then int8_float32: its int8 weights with float32 activations); [] without ctranslate2."""
    try:
        import ctranslate2
    except ImportError:
        return []
    have = set(ctranslate2.get_supported_compute_types("cpu"))
    reduced = next((t for t in ("bfloat16", "float16", "int8_bfloat16", "int8_float32", "int8") if t in have), None)
    return ["float32"] + ([reduced] if reduced else [])


def ct2_rows(model: Path, reqs: list[Request], repeats: int, work: Path, types: list[str] | None = None) -> list[dict]:
    """A row per compute type (``types``, or :func:`ct2_types`): the requests in one ``generate_batch``, greedy,
    EOS ignored (min_length = max_length = the longest output), after an untimed 4-token warm-up batch."""
    try:
        import ctranslate2
    except ImportError as exc:
        return [{"peer": "CTranslate2", "dtype": "float32", "error": f"not installed (pip install -e .[peers]): {exc}"}]
    import torch

    out = work / f"{model.name}-ct2"
    try:
        t0 = time.perf_counter()
        ctranslate2.converters.TransformersConverter(str(model)).convert(str(out), force=True)
        convert_s = time.perf_counter() - t0
        vocab = json.loads((out / "vocabulary.json").read_text())  # id -> the token string CT2 takes
    except Exception as exc:  # noqa: BLE001
        return [{"peer": f"CTranslate2 {ctranslate2.__version__}", "dtype": "float32", "error": f"convert: {exc}"}]
    rows = []
    try:
        for ct in types or ct2_types():
            row: dict[str, Any] = {"peer": f"CTranslate2 {ctranslate2.__version__}", "dtype": ct,
                                   "convert_s": convert_s}
            try:
                gen = ctranslate2.Generator(str(out), device="cpu", compute_type=ct,
                                            intra_threads=torch.get_num_threads() or cores())
                prompts = [[vocab[i] for i in r.prompt_ids] for r in reqs]
                # one batch per distinct output length would favour CT2; the workload's lengths differ per
                # request and generate_batch takes one max_length, so every row runs to the longest (as HF's
                # static batch does) and only each request's own tokens count
                longest = max(r.max_new_tokens for r in reqs)
                kw = dict(max_length=longest, min_length=longest, sampling_topk=1, include_prompt_in_result=False,
                          max_batch_size=len(reqs), end_token=[])
                gen.generate_batch(prompts[:2], **{**kw, "max_length": 4, "min_length": 4})  # warm-up, untimed
                dts, res = [], []
                for _ in range(repeats):
                    t = time.perf_counter()
                    res = gen.generate_batch(prompts, **kw)
                    dts.append(time.perf_counter() - t)
                useful = sum(min(len(x.sequences_ids[0]), r.max_new_tokens) for x, r in zip(res, reqs))
                dt = sorted(dts)[len(dts) // 2]
                row.update(tok_s=useful / dt, runs=[round(useful / d) for d in dts], tokens=useful,
                           outputs=[x.sequences_ids[0][:r.max_new_tokens] for x, r in zip(res, reqs)])
                del gen
                _log(f"CTranslate2 {ct}: {row['tok_s']:.0f} tok/s (runs {row['runs']})")
            except Exception as exc:  # noqa: BLE001
                row["error"] = str(exc)
                _log(f"CTranslate2 {ct}: {exc}")
            rows.append(row)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return rows


def run_peers(model: Path, reqs: list[Request], context: int, repeats: int, which=("llama.cpp", "ctranslate2"),
              gguf_types: tuple[str, ...] = GGUF_TYPES, ct2: list[str] | None = None) -> list[dict]:
    """Every peer on ``reqs`` (token ids) for the HF model directory ``model`` with a ``context``-token window.
    Never raises: a peer that failed is a row with ``error``."""
    work = Path(tempfile.mkdtemp(prefix="llmos-peers-", dir="/tmp"))
    rows: list[dict] = []
    try:
        if "llama.cpp" in which:
            rows += llama_rows(model, reqs, context, repeats, work, gguf_types)
        if "ctranslate2" in which:
            rows += ct2_rows(model, reqs, repeats, work, ct2)
    except Exception as exc:  # noqa: BLE001 - the benchmark goes on without the peers
        rows.append({"peer": "peers", "dtype": "-", "error": f"{type(exc).__name__}: {exc}"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":  # build (or find) the cached llama-server: `python -m benchmarks.peers`
    print(llama_server()[0])
