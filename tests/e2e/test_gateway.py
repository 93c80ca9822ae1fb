"""`llmos serve` as users run it: the real `openai` package against a real gateway process and the shared kernel.

One gateway for the module (its own home, so its API keys are its own), started as `llmos serve --port P`.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmos import NoSuchProcess
from llmos.cli import main as cli_main
from tests.conftest import free_port, wait_for

BIN = [sys.executable, "-m", "llmos"]
LONG = {"ignore_eos": True}


def as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background test run ignores SIGINT; the gateway must not


class Gateway:
    """A `llmos serve` subprocess with its own home (API keys under HOME/gateway)."""

    def __init__(self, kernel, address: str | None = None, extra: tuple[str, ...] = ()) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="llmos-gw-", dir="/tmp"))
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
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(30)
        finally:
            self.proc.kill() if self.proc.poll() is None else None
            self.proc.communicate()
            shutil.rmtree(self.home, ignore_errors=True)
        return rc


@pytest.fixture(scope="module")
def gateway(kernel):
    g = Gateway(kernel)
    yield g
    assert g.stop() == 0


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


def test_models_lists_the_loaded_model_and_one_by_id(gateway, tiny_model):
    oc = gateway.openai()
    assert tiny_model in [m.id for m in oc.models.list()]
    assert oc.models.retrieve(tiny_model).id == tiny_model
    with pytest.raises(openai.NotFoundError):
        oc.models.retrieve("/no/such/model")


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
        oc.completions.create(model="/no/such/model", prompt="x", max_tokens=2)
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


def _new_pid(client, before: set[int]) -> int:
    [pid] = wait_for(lambda: [p.pid for p in client.ps() if p.pid not in before and p.output_tokens > 0], 30,
                     "the gateway's process to generate")
    return pid


def _killed_and_reaped(client, pid: int) -> None:
    wait_for(lambda: pid not in {p.pid for p in client.ps()}, 30, f"the gateway to reap {pid}")
    with pytest.raises(NoSuchProcess):
        client.stat(pid)
    exits = [json.loads(line) for line in client.dmesg(n=2000)]
    [end] = [e for e in exits if e.get("event") == "exit" and e.get("pid") == pid]
    assert end["reason"] == "killed"  # TERM, not a natural end


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_has_its_process_killed_and_reaped(gateway, client, long_model, stream):
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


def test_a_session_keeps_its_context_between_requests_until_deleted(gateway, client, tiny_model):
    oc = gateway.openai()
    first = oc.chat.completions.create(model=tiny_model, messages=[{"role": "system", "content": "s"},
                                                                   {"role": "user", "content": "one"}],
                                       max_tokens=3, temperature=0, extra_body={"session": True, **LONG})
    pid = first.model_extra["session"]
    assert client.stat(pid).state == "BLOCKED" and client.stat(pid).session
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


def test_api_keys_pick_the_user_and_a_missing_or_unknown_key_is_401(gateway, kernel, client, tiny_model):
    add = gateway.llmos("api-key", "add", "alice", "--json")
    assert add.returncode == 0, add.stderr
    key = json.loads(add.stdout)["key"]
    keys_file = gateway.home / "gateway" / "api_keys.json"
    assert oct(keys_file.stat().st_mode & 0o777) == "0o600" and key not in keys_file.read_text()
    try:
        status, body = gateway.get("/v1/models")  # no Authorization header at all
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            gateway.openai(key="llmos-wrong").models.list()
        oc = gateway.openai(key)
        bob = gateway.openai(json.loads(gateway.llmos("api-key", "add", "bob", "--json").stdout)["key"])
        r = oc.chat.completions.create(model=tiny_model, messages=[{"role": "user", "content": "k"}], max_tokens=2,
                                       extra_body={"session": True})
        pid = r.model_extra["session"]
        assert client.stat(pid).owner == "alice"  # the gateway (the admin here) acts for the key's user
        assert [p.owner for p in client.ps() if p.pid == pid] == ["alice"]
        with pytest.raises(openai.PermissionDeniedError):  # alice's session, not bob's
            bob.chat.completions.create(model=tiny_model, messages=[{"role": "user", "content": "k"}],
                                        extra_body={"session": pid})
        client.close(pid)
        ls = json.loads(gateway.llmos("api-key", "ls", "--json").stdout)
        assert sorted(k["user"] for k in ls) == ["alice", "bob"]
    finally:
        assert gateway.llmos("api-key", "rm", "alice").returncode == 0
    try:
        with pytest.raises(openai.AuthenticationError):  # withdrawn: refused at once
            gateway.openai(key).models.list()
    finally:
        assert gateway.llmos("api-key", "rm", "bob").returncode == 0
    assert gateway.openai(key).models.list()  # no key left: keyless again, as the gateway's own user


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
    types = [line.split()[2] for line in text.decode().splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))  # no metric name twice


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
