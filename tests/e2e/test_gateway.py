"""`llmos serve` as users run it: the real `openai` package against a real gateway process and the shared kernel.

One gateway for the module (its own home, so its API keys are its own), started as `llmos serve --port P`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmos import NoSuchProcess
from llmos import store_models
from llmos.cli import main as cli_main
from llmos.cli_serve import DEFAULT_MAX_CHOICES as CLI_MAX_CHOICES
from llmos.gateway import apikeys, errors
from llmos.gateway.app import DEFAULT_MAX_CHOICES
from llmos.syscalls.errors import Errno
from tests.conftest import free_port, wait_for

BIN = [sys.executable, "-m", "llmos"]
LONG = {"ignore_eos": True}


def as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background test run ignores SIGINT; the gateway must not


class Gateway:
    """A `llmos serve` subprocess with its own home (API keys under HOME/gateway)."""

    def __init__(self, kernel, address: str | None = None, extra: tuple[str, ...] = (), home: Path | None = None) -> None:
        self.home = home or Path(tempfile.mkdtemp(prefix="llmos-gw-", dir="/tmp"))  # removed by stop()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = kernel.env
        self.proc = subprocess.Popen(
            [*BIN, "serve", "--port", str(self.port), "--home", str(self.home), "--address",
             address or kernel.address, *extra], env=kernel.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, preexec_fn=as_in_a_terminal)
        wait_for(self._listening, 30, "the gateway to listen")

    def _listening(self) -> bool:
        assert self.proc.poll() is None, self.proc.communicate()[1]
        try:
            urllib.request.urlopen(self.url + "/health", timeout=5).close()
        except urllib.error.HTTPError:
            pass  # it answers (a 503: its kernel is away)
        except OSError:
            return False
        return True

    def openai(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def aopenai(self, key: str = "none") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def llmos(self, *args: str) -> subprocess.CompletedProcess:
        return llmos_here(*args, "--home", str(self.home))

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stop(self) -> int:
        """SIGTERM, then its exit status (its stderr is left in ``self.stderr``)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(30)
        finally:
            self.proc.kill() if self.proc.poll() is None else None
            self.stderr = self.proc.communicate()[1]
            shutil.rmtree(self.home, ignore_errors=True)
        return rc


@pytest.fixture(scope="module")
def gateway(kernel):
    g = Gateway(kernel)
    yield g
    assert g.stop() == 0
    # the kernel's admin runs it without keys: it says that its requests act for 'anonymous'
    assert "requests act for 'anonymous'" in g.stderr and "Traceback" not in g.stderr, g.stderr


def llmos_here(*argv: str) -> subprocess.CompletedProcess:
    """An `llmos` command run in this process (these need no kernel: a subprocess would only add its start-up)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(list(argv))
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


def greedy(client, model: str, n: int, **kw) -> str:
    return client.wait(client.spawn(model=model, max_new_tokens=n, temperature=0.0, ignore_eos=True, **kw)).text


def post(gateway: Gateway, path: str, body: dict | bytes, headers: dict | None = None) -> http.client.HTTPConnection:
    """Send a POST and return the open connection (its response not read yet)."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, raw, {"Content-Type": "application/json", **(headers or {})})
    return conn


def test_models_lists_default_the_loaded_and_the_stores_and_finds_every_name_a_request_takes(gateway, client,
                                                                                            tiny_model):
    name = f"gw{uuid.uuid4().hex[:10]}"  # the shared kernel's store outlives the test: a name of its own
    store_models.import_model(client, tiny_model, name)
    try:
        oc = gateway.openai()
        ids = [m.id for m in oc.models.list()]
        assert ids[0] == "default" and tiny_model in ids and f"store:/models/{name}" in ids
        for asked in ("default", tiny_model, tiny_model + "/", name, f"/models/{name}", f"store:/models/{name}"):
            assert oc.models.retrieve(asked).id == asked
        for unknown in ("/no/such/model", "nosuchmodel", "store:/models/nosuchmodel"):
            with pytest.raises(openai.NotFoundError) as nf:
                oc.models.retrieve(unknown)
            assert nf.value.body["code"] == "model_not_found"
    finally:
        client.fs.rm(f"/models/{name}", recursive=True)


def test_completion_and_chat_with_the_sync_client_are_the_kernels_text_with_usage(gateway, client, tiny_model):
    oc = gateway.openai()
    r = oc.completions.create(model=tiny_model, prompt="hello", max_tokens=5, temperature=0, extra_body=LONG)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == greedy(client, tiny_model, 5, prompt="hello")
    assert r.choices[0].finish_reason == "length"
    prompt = client.score(text="hello", model=tiny_model)["tokens"]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt, 5, prompt + 5)
    c = oc.chat.completions.create(model=tiny_model, messages=[{"role": "user", "content": "hi"}],
                                   max_completion_tokens=4, temperature=0, extra_body=LONG)
    msgs = [{"role": "user", "content": "hi"}]
    assert c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == greedy(client, tiny_model, 4, messages=msgs)
    assert c.usage.completion_tokens == 4 and c.usage.prompt_tokens > 4  # the chat template's tokens too


def test_streaming_chunks_add_up_to_the_text_and_include_usage_ends_with_the_usage(gateway, client, tiny_model):
    oc = gateway.openai()
    want = greedy(client, tiny_model, 6, prompt="stream")
    chunks = list(oc.completions.create(model=tiny_model, prompt="stream", max_tokens=6, temperature=0, stream=True,
                                        stream_options={"include_usage": True}, extra_body=LONG))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    conn = post(gateway, "/v1/chat/completions", {"model": tiny_model, "messages": [{"role": "user", "content": "x"}],
                                                  "max_tokens": 3, "stream": True})
    resp = conn.getresponse()
    raw = resp.read().decode()
    conn.close()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_the_async_client_streams_n_choices_and_the_same_seed_repeats_them(gateway, tiny_model):
    async def go() -> tuple[dict[int, str], list[str]]:
        oc = gateway.aopenai()
        texts: dict[int, str] = {}
        stream = await oc.chat.completions.create(model=tiny_model, messages=[{"role": "user", "content": "a"}],
                                                  n=3, max_tokens=5, temperature=1.0, seed=11, stream=True)
        async for chunk in stream:
            for ch in chunk.choices:
                texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
        again = await oc.chat.completions.create(model=tiny_model, messages=[{"role": "user", "content": "a"}],
                                                 n=3, max_tokens=5, temperature=1.0, seed=11)
        await oc.close()
        return texts, [c.message.content for c in sorted(again.choices, key=lambda c: c.index)]

    streamed, repeated = asyncio.run(go())
    assert sorted(streamed) == [0, 1, 2]
    assert [streamed[i] for i in range(3)] == repeated  # seed, seed+1, seed+2: the same again
    assert len(set(repeated)) > 1  # n choices differ


def test_stop_ends_the_text_before_the_stop_string(gateway, client, tiny_model):
    full = greedy(client, tiny_model, 12, prompt="stop here")
    word = next(full[i:i + 2] for i in range(3, len(full) - 1) if "\ufffd" not in full[i:i + 2]
                and full[i:i + 2] not in full[:i])
    oc = gateway.openai()
    r = oc.completions.create(model=tiny_model, prompt="stop here", max_tokens=12, temperature=0, stop=[word, "zzzz"],
                              extra_body=LONG)
    assert r.choices[0].text == full[:full.index(word)] and r.choices[0].finish_reason == "stop"


def test_logprobs_are_the_kernels_scores_of_the_chosen_tokens(gateway, client, tiny_model):
    oc = gateway.openai()
    r = oc.completions.create(model=tiny_model, prompt="score me", max_tokens=4, temperature=0, logprobs=0,
                              extra_body=LONG)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == 4
    pid = client.spawn(model=tiny_model, prompt="score me", max_new_tokens=4, temperature=0.0, ignore_eos=True)
    res = client.wait(pid)
    prompt = client.score(text="score me", model=tiny_model)["token_ids"]
    want = client.score(model=tiny_model, prompt_ids=prompt + res.token_ids)["logprobs"][len(prompt) - 1:]
    assert lp.token_logprobs == pytest.approx(want, abs=1e-5) and all(x <= 0 for x in want)
    c = oc.chat.completions.create(model=tiny_model, messages=[{"role": "user", "content": "q"}], max_tokens=3,
                                   temperature=0, logprobs=True, extra_body=LONG)
    assert len(c.choices[0].logprobs.content) == 3
    assert "".join(t.token for t in c.choices[0].logprobs.content) == c.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as bad:
        oc.chat.completions.create(model=tiny_model, messages=[{"role": "user", "content": "q"}], max_tokens=3,
                                   logprobs=True, top_logprobs=2)
    assert "top_logprobs" in str(bad.value) and bad.value.body["param"] == "top_logprobs"


def test_errors_come_in_openais_shape_with_the_right_status(gateway, tiny_model):
    oc = gateway.openai()
    with pytest.raises(openai.NotFoundError) as nf:
        oc.completions.create(model="no-such-model", prompt="x", max_tokens=2)  # a store name (a directory: 403)
    assert nf.value.body["code"] == "model_not_found" and nf.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        oc.completions.create(model=tiny_model, prompt="x", max_tokens=2, temperature=7)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):  # the kernel's own EINVAL: prompt ids outside the vocabulary
        oc.completions.create(model=tiny_model, prompt=[10**9], max_tokens=2)
    with pytest.raises(openai.BadRequestError) as big:  # E2BIG: longer than the context
        oc.completions.create(model=tiny_model, prompt="w" * 5000, max_tokens=2)
    assert big.value.body["code"] == "context_length_exceeded"
    conn = post(gateway, "/v1/completions", b"{not json")
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    assert b"Traceback" not in json.dumps(body).encode()
    status, raw = gateway.get("/v1/nothing-here")
    assert status == 404 and "error" in json.loads(raw)


def _refusal(gateway: Gateway, path: str, body: bytes) -> tuple[int, dict]:
    conn = post(gateway, path, body)
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    return resp.status, answer.get("error") or answer


def test_what_openai_refuses_is_a_400_naming_the_field(gateway, client, tiny_model):
    chat = '{"model": "%s", "messages": [{"role": "%s", "content": "x"}]%s}'
    comp = '{"model": "%s", "prompt": %s, "max_tokens": 1%s}'
    cases = [  # (path, body, param, words the message has)
        ("chat", chat % (tiny_model, "wizard", ""), "messages.0.role", "'developer' or 'tool'"),
        ("completions", comp % (tiny_model, '"x"', ', "max_tokens": true'), "max_tokens", "integer"),
        ("completions", comp % (tiny_model, '"x"', ', "n": true'), "n", "integer"),
        ("completions", comp % (tiny_model, '"x"', ', "seed": false'), "seed", "integer"),
        ("chat", chat % (tiny_model, "user", ', "top_logprobs": true'), "top_logprobs", "integer"),
        ("completions", comp % (tiny_model, "[true]", ""), "prompt", "forms"),
        ("completions", comp % (tiny_model, "[-1]", ""), "prompt", "greater than or equal to 0"),
        ("completions", comp % (tiny_model, '"x"', ', "stop": ""'), "stop", "empty"),
        ("completions", comp % (tiny_model, '"x"', ', "stop": ["a", ""]'), "stop", "stop[1] is empty"),
        ("completions", comp % (tiny_model, '"x"', ', "stop": ' + json.dumps(list("abcdefghijklmnopq"))), "stop",
         "17 items"),
        ("completions", comp % (tiny_model, '"x"', ', "temperature": NaN'), "temperature", "finite"),
        ("completions", comp % (tiny_model, "[1000000000]", ""), "prompt", "token ids"),  # the kernel's EINVAL
    ]
    before = {p.pid for p in client.ps()}
    for path, body, param, words in cases:
        status, error = _refusal(gateway, f"/v1/{path.replace('chat', 'chat/completions')}", body.encode())
        assert (status, error.get("param")) == (400, param) and words in error["message"], (body, error)
    assert {p.pid for p in client.ps()} <= before  # none ran


def _new_pid(client, before: set[int]) -> int:
    [pid] = wait_for(lambda: [p.pid for p in client.ps() if p.pid not in before and p.output_tokens > 0], 30,
                     "the gateway's process to generate")
    return pid


def _killed_and_reaped(client, pid: int) -> None:
    wait_for(lambda: pid not in {p.pid for p in client.ps()}, 30, f"the gateway to reap {pid}")
    with pytest.raises(NoSuchProcess):
        client.stat(pid)
    events = [json.loads(line) for line in client.dmesg(n=2000)]
    [end] = [e for e in events if e.get("event") == "exit" and e.get("pid") == pid]
    assert end["reason"] == "killed"  # TERM, not a natural end
    signals = [e["signal"] for e in events if e.get("event") == "signal" and e.get("pid") == pid]
    assert signals == ["TERM"]  # ended once (not by two clean-ups racing)


def _served(gateway: Gateway, endpoint: str) -> dict[str, float]:
    """llmos_gateway_requests_total of ``endpoint`` by status, from /metrics."""
    families = {f.name: f for f in text_string_to_metric_families(gateway.get("/metrics")[1].decode())}
    return {s.labels["status"]: s.value for s in families["llmos_gateway_requests"].samples
            if s.name.endswith("_total") and s.labels["endpoint"] == endpoint}


def _counted_since(gateway: Gateway, counted: dict[str, float]) -> dict[str, float] | None:
    now = _served(gateway, "/v1/completions")
    return now if sum(now.values()) > sum(counted.values()) else None


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_has_its_process_killed_and_reaped_and_counted_499(gateway, client, long_model,
                                                                                  stream):
    counted = _served(gateway, "/v1/completions")
    before = {p.pid for p in client.ps()}
    conn = post(gateway, "/v1/completions", {"model": long_model, "prompt": "on and on", "max_tokens": 100000,
                                             "stream": stream, **LONG})
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")  # generating
    pid = _new_pid(client, before)
    conn.sock.shutdown(2)
    conn.close()
    _killed_and_reaped(client, pid)
    # counted once its response ended (a cut stream too, though its 200 was sent): as the client gone first
    now = wait_for(lambda: _counted_since(gateway, counted), 30, "the request to be counted")
    assert {k: v - counted.get(k, 0) for k, v in now.items() if v != counted.get(k, 0)} == {"499": 1}


def test_a_session_keeps_its_context_between_requests_until_deleted(gateway, client, tiny_model):
    oc = gateway.openai()
    first = oc.chat.completions.create(model=tiny_model, messages=[{"role": "system", "content": "s"},
                                                                   {"role": "user", "content": "one"}],
                                       max_tokens=3, temperature=0, extra_body={"session": True, **LONG})
    pid = first.model_extra["session"]
    assert client.stat(pid).state == "BLOCKED" and client.stat(pid).session
    assert client.stat(pid).owner == "anonymous"  # keyless, and the gateway's user is the admin: not the admin
    second = oc.chat.completions.create(model=tiny_model, messages=[{"role": "user", "content": "two"}],
                                        max_tokens=3, temperature=0, extra_body={"session": pid})
    assert second.model_extra["session"] == pid and second.usage.completion_tokens == 3
    assert second.usage.prompt_tokens_details.cached_tokens > 0  # the first turn's context, kept
    req = urllib.request.Request(f"{gateway.url}/v1/sessions/{pid}", method="DELETE")
    assert json.loads(urllib.request.urlopen(req, timeout=30).read())["deleted"] is True
    with pytest.raises(NoSuchProcess):
        client.stat(pid)
    with pytest.raises(openai.NotFoundError) as gone:
        oc.chat.completions.create(model=tiny_model, messages=[{"role": "user", "content": "3"}],
                                   extra_body={"session": pid})
    assert gone.value.body["param"] == "session"


def test_api_keys_pick_the_user_and_removing_every_key_never_turns_authentication_off(kernel, client, tiny_model):
    home = Path(tempfile.mkdtemp(prefix="llmos-gw-", dir="/tmp"))
    add = llmos_here("api-key", "add", "alice", "--json", "--home", str(home))  # before the start: keys required
    assert add.returncode == 0, add.stderr
    key = json.loads(add.stdout)["key"]
    keys_file = home / "gateway" / "api_keys.json"
    assert oct(keys_file.stat().st_mode & 0o777) == "0o600" and key not in keys_file.read_text()
    g = Gateway(kernel, home=home)
    try:
        status, body = g.get("/v1/models")  # no Authorization header at all
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            g.openai(key="llmos-wrong").models.list()
        oc = g.openai(key)
        bob_key = json.loads(llmos_here("api-key", "add", "bob", "--json", "--home", str(home)).stdout)["key"]
        bob = g.openai(bob_key)
        r = oc.chat.completions.create(model=tiny_model, messages=[{"role": "user", "content": "k"}], max_tokens=2,
                                       extra_body={"session": True})
        pid = r.model_extra["session"]
        assert client.stat(pid).owner == "alice"  # the gateway (the admin here) acts for the key's user
        assert [p.owner for p in client.ps() if p.pid == pid] == ["alice"]
        with pytest.raises(openai.NotFoundError) as theirs:  # alice's session is not one bob opened here
            bob.chat.completions.create(model=tiny_model, messages=[{"role": "user", "content": "k"}],
                                        extra_body={"session": pid})
        assert theirs.value.body["param"] == "session"
        req = urllib.request.Request(f"{g.url}/v1/sessions/{pid}", method="DELETE",
                                     headers={"Authorization": f"Bearer {bob_key}"})
        with pytest.raises(urllib.error.HTTPError) as not_bobs:
            urllib.request.urlopen(req, timeout=30)
        assert not_bobs.value.code == 404 and client.stat(pid).state == "BLOCKED"  # still there
        client.close(pid)
        ls = json.loads(llmos_here("api-key", "ls", "--json", "--home", str(home)).stdout)
        assert sorted(k["user"] for k in ls) == ["alice", "bob"]
        good = keys_file.read_bytes()
        keys_file.write_text("{not json")  # a broken file: every request refused, its path not told
        status, body = g.get("/v1/models")
        assert status == 503 and str(home) not in body.decode() and "api_keys" not in body.decode()
        keys_file.write_bytes(good)
        assert llmos_here("api-key", "rm", "alice", "--home", str(home)).returncode == 0
        with pytest.raises(openai.AuthenticationError):  # withdrawn: refused at once
            oc.models.list()
        assert bob.models.list()
        assert llmos_here("api-key", "rm", "bob", "--home", str(home)).returncode == 0
        with pytest.raises(openai.AuthenticationError):  # no key left: still required, nobody gets in
            g.openai().models.list()
        keys_file.unlink()
        status, body = g.get("/v1/models")
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    finally:
        assert g.stop() == 0


def test_concurrent_api_key_adds_keep_every_key(tmp_path):
    path = tmp_path / "gateway" / "api_keys.json"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        added = list(pool.map(lambda i: apikeys.add(path, f"u{i % 4}")[1].id, range(64)))
    assert sorted(k.id for k in apikeys.load(path)) == sorted(added)


def test_health_and_metrics_in_the_prometheus_text_format(gateway, tiny_model):
    gateway.openai().completions.create(model=tiny_model, prompt="m", max_tokens=2, stream=True).close()
    status, body = gateway.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, text = gateway.get("/metrics")
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    served = {(s.labels["endpoint"], s.labels["status"]): s.value for s in families["llmos_gateway_requests"].samples
              if s.name.endswith("_total")}
    assert served[("/v1/completions", "200")] >= 1 and served[("/health", "200")] >= 1
    ttft = [s for s in families["llmos_gateway_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in ttft) >= 1
    assert "llmos_gateway_requests_in_flight" in families and "llmos_gateway_request_duration_seconds" in families
    assert "llmos_processes" in families  # the kernel's own registry follows the gateway's
    [start] = families["process_start_time_seconds"].samples  # the gateway's own process, not the kernel's
    assert start.value == pytest.approx(_started_at(gateway.proc.pid), abs=0.02)
    types = [line.split()[2] for line in text.decode().splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))  # no metric name twice


def _started_at(pid: int) -> float:
    """When process ``pid`` started (unix time), from /proc as prometheus_client's ProcessCollector reads it."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime "))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def test_a_streamed_session_says_its_pid_in_every_chunk_and_a_header(gateway, client, tiny_model):
    conn = post(gateway, "/v1/chat/completions", {"model": tiny_model, "messages": [{"role": "user", "content": "s"}],
                                                  "max_tokens": 3, "stream": True, "session": True, **LONG})
    resp = conn.getresponse()
    events = [e for e in resp.read().decode().split("\n\n") if e]
    conn.close()
    pid = int(resp.getheader("x-llmos-session"))
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks and all(c["session"] == pid for c in chunks) and events[-1] == "data: [DONE]"
    assert client.stat(pid).session
    oc = gateway.openai()  # the next turn, streamed with the openai package: the pid is in its chunks too
    stream = oc.chat.completions.create(model=tiny_model, messages=[{"role": "user", "content": "t"}], max_tokens=2,
                                        stream=True, extra_body={"session": pid})
    assert {c.model_extra["session"] for c in stream} == {pid}
    req = urllib.request.Request(f"{gateway.url}/v1/sessions/{pid}", method="DELETE")
    assert json.loads(urllib.request.urlopen(req, timeout=30).read())["deleted"] is True


def test_one_request_starts_at_most_max_choices_processes(gateway, client, tiny_model):
    before = len(client.ps())
    with pytest.raises(openai.BadRequestError) as many:  # 5 prompts x 16 = 80 processes
        gateway.openai().completions.create(model=tiny_model, prompt=["a", "b", "c", "d", "e"], n=16, max_tokens=1)
    assert "64" in many.value.body["message"] and many.value.body["param"] == "n"
    assert len(client.ps()) == before  # refused before anything was spawned


def test_keyless_admin_gateway_acts_for_anonymous_and_reaches_only_sessions_it_opened(gateway, client, tiny_model):
    oc = gateway.openai()
    with pytest.raises(openai.PermissionDeniedError):  # a negative priority is the admin's: not anonymous's
        oc.completions.create(model=tiny_model, prompt="p", max_tokens=1, extra_body={"priority": -5})
    mine = client.spawn(model=tiny_model, session=True)  # the admin's session, not opened through the gateway
    try:
        with pytest.raises(openai.NotFoundError):
            oc.chat.completions.create(model=tiny_model, messages=[{"role": "user", "content": "x"}], max_tokens=1,
                                       extra_body={"session": mine})
        status, _ = _delete(gateway, mine)
        assert status == 404 and client.stat(mine).state == "BLOCKED"  # untouched
    finally:
        client.close(mine)


def _delete(gateway: Gateway, pid: int) -> tuple[int, bytes]:
    req = urllib.request.Request(f"{gateway.url}/v1/sessions/{pid}", method="DELETE")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_seed_plus_choice_wraps_within_the_kernels_seed_range(gateway, tiny_model):
    oc = gateway.openai()
    top = oc.completions.create(model=tiny_model, prompt="w", n=2, max_tokens=4, seed=2**63 - 1, extra_body=LONG)
    zero = oc.completions.create(model=tiny_model, prompt="w", max_tokens=4, seed=0, extra_body=LONG)
    assert sorted(top.choices, key=lambda c: c.index)[1].text == zero.choices[0].text  # 2**63 - 1 + 1 wraps to 0


def test_the_developer_role_is_the_system_role(gateway, client, tiny_model):
    r = gateway.openai().chat.completions.create(
        model=tiny_model, messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=5, temperature=0, extra_body=LONG)
    want = greedy(client, tiny_model, 5, messages=[{"role": "system", "content": "be brief"},
                                                   {"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == want


def test_llmos_serves_default_max_choices_is_the_gateways():
    assert CLI_MAX_CHOICES == DEFAULT_MAX_CHOICES  # a copy, so that `llmos serve --help` needs no FastAPI


def test_a_choice_that_ended_in_error_fails_the_request_even_without_an_errno():
    assert errors.of_outcome("error", None).status == 500
    assert errors.of_outcome("error", {"errno": int(Errno.ETIMEDOUT), "message": "late"}).status == 504
    assert all(errors.of_outcome(r, None) is None for r in ("stop", "length", "killed", "closed"))


async def asgi(app, method: str, path: str, body: dict | None = None) -> tuple[int, bytes, dict[str, str]]:
    """One HTTP request to an ASGI app in this process: (status, body, headers). The client never goes away."""
    raw = json.dumps(body).encode() if body is not None else b""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"gateway"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    given = False
    out: dict = {"status": 0, "body": b"", "headers": {}}

    async def receive() -> dict:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()  # never a disconnect
        return {}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = {k.decode(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return out["status"], out["body"], out["headers"]


def test_a_dropped_kernel_connection_is_made_again_on_every_route(kernel, client, tiny_model, tmp_path):
    from llmos.gateway.app import ANONYMOUS, GatewayConfig, create_app

    app = create_app(GatewayConfig(kernel.address, tmp_path / "api_keys.json"))
    gw = app.state.gateway

    async def drop_connections() -> None:  # what a kernel that went away leaves: calls on them fail, KernelGone
        own = await gw.link.client(None)
        assert own.kernel["admin"]  # this test process started the kernel: keyless calls act for anonymous
        for c in (own, await gw.link.client(ANONYMOUS)):
            await c.close()

    async def go() -> None:
        try:
            status, body, _ = await asgi(app, "POST", "/v1/chat/completions", {
                "model": tiny_model, "messages": [{"role": "user", "content": "d"}], "max_tokens": 1,
                "session": True})
            assert status == 200, body
            session = json.loads(body)["session"]
            for method, path, ok in (("GET", "/v1/models", 200), ("GET", f"/v1/models/{tiny_model}", 200),
                                     ("GET", "/metrics", 200), ("DELETE", f"/v1/sessions/{session}", 200)):
                await drop_connections()
                status, body, _ = await asgi(app, method, path)
                if path == "/metrics":  # always served; the kernel's part is missing while the link is down
                    assert status == 200 and b"llmos_processes" not in body
                else:
                    assert status == 503, (path, status, body)
                status, body, _ = await asgi(app, method, path)  # the next request connects afresh
                assert status == ok, (path, status, body)
                assert path != "/metrics" or b"llmos_processes" in body
        finally:
            await gw.close()

    asyncio.run(go())
    assert not [p for p in client.ps() if p.owner == ANONYMOUS and p.session]  # the session was closed


def test_without_a_kernel_health_is_503_and_requests_are_503(kernel, tiny_model):
    g = Gateway(kernel, address="ipc:///tmp/llmos-no-kernel-here/kernel.sock")
    try:
        assert g.get("/health")[0] == 503
        with pytest.raises(openai.InternalServerError) as exc:
            g.openai().completions.create(model=tiny_model, prompt="x", max_tokens=1)
        assert exc.value.status_code == 503
    finally:
        assert g.stop() == 0


def test_serving_beyond_loopback_needs_api_keys_and_bad_api_key_commands_are_one_line(kernel):
    home = tempfile.mkdtemp(prefix="llmos-gw-", dir="/tmp")
    try:
        r = llmos_here("serve", "--host", "0.0.0.0", "--port", str(free_port()), "--home", home)
        assert r.returncode == 2 and "loopback" in r.stderr and "llmos api-key add" in r.stderr
        rm = llmos_here("api-key", "rm", "nobody", "--home", home)
        assert rm.returncode == 1 and rm.stderr.startswith("llmos: [ENOENT]") and "Traceback" not in rm.stderr
        bad = llmos_here("api-key", "add", "no/slash", "--home", home)
        assert bad.returncode == 1 and "[EINVAL]" in bad.stderr
        assert llmos_here("api-key", "ls", "--home", home).stdout.startswith("no API keys")
    finally:
        shutil.rmtree(home, ignore_errors=True)
