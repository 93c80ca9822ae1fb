"""Signals, renice and sessions as a user reaches them: the client, the ``llmos`` CLI and the shell, against
the shared kernel. Who may signal or renice whom is checked with users named in the hello."""

import asyncio
import json
import subprocess
import sys
import time

import pytest

from llmos import AsyncClient, Client, NoSuchProcess, NotPermitted
from tests.conftest import wait_for
from tests.tinymodel import make_tiny_llama

BIN = [sys.executable, "-m", "llmos"]
GREEDY = {"temperature": 0.0, "ignore_eos": True}


def llmos(kernel, *args, input=None, env=None, timeout=120):
    return subprocess.run([*BIN, *args], env=env or kernel.env, capture_output=True, text=True, input=input,
                          timeout=timeout)


def as_user(kernel, name):
    """The environment of a CLI that is ``name`` to the kernel (its CURVE key over tcp)."""
    return kernel.env_as(name)


def state_of(client, pid):
    return client.stat(pid).state


def started(client, pid):
    return lambda: client.stat(pid).output_tokens > 0


def end_and_reap(client, *pids):
    for pid in pids:
        try:
            client.kill(pid, "KILL")
            client.wait(pid, timeout=30)
        except NoSuchProcess:
            pass


def test_stop_then_cont_resumes_a_process_that_ends_with_the_uninterrupted_output(client, long_model):
    n = 120
    alone = client.wait(client.spawn(prompt="resume me", model=long_model, max_new_tokens=n, **GREEDY))
    pid = client.spawn(prompt="resume me", model=long_model, max_new_tokens=n, **GREEDY)
    wait_for(started(client, pid), what="the first token")
    assert client.stop(pid) == "STOPPED"
    held = client.stat(pid)
    assert held.state == "STOPPED" and held.output_tokens < n
    # a stopped process generates nothing more, but the steps in flight when STOP came may still land (on a busy
    # machine the preempt can wait behind a step or two in the worker): once they have, the count stays
    time.sleep(0.5)
    settled = client.stat(pid).output_tokens
    assert settled <= held.output_tokens + 4
    time.sleep(0.5)
    assert client.stat(pid).output_tokens == settled
    assert client.cont(pid) in ("READY", "RUNNING")
    result = client.wait(pid)
    assert result.finish_reason == "length" and result.stats.output_tokens == n
    assert result.token_ids == alone.token_ids  # exactly where it was: the same tokens as a run never stopped
    assert result.sched.get("preemptions", 0) >= 1


def test_nice_changes_a_live_process_priority_and_ps_shows_it(client, long_model):
    pid = client.spawn(prompt="renice me", model=long_model, max_new_tokens=100000, **GREEDY)
    try:
        reply = client.nice(pid, 7)
        assert reply["pid"] == pid and reply["priority"] == 7
        assert {p.pid: p.priority for p in client.ps()}[pid] == 7
    finally:
        end_and_reap(client, pid)


def test_a_session_keeps_its_context_and_its_second_turn_prefills_only_the_new_tokens(client, tiny_model):
    with client.session(model=tiny_model, system="You are brief.", max_new_tokens=6, **GREEDY) as s:
        pid = s.pid
        first = s.send("hello")
        turn1 = s.last
        chunks = list(s.stream("and again"))
        turn2 = s.last
        assert client.stat(pid).state == "BLOCKED" and client.stat(pid).session
    assert first == turn1.text and "".join(chunks) == turn2.text and turn2.stats.output_tokens == 6
    assert turn1.stats.prefill_tokens > 0 and turn2.stats.context_tokens > turn1.stats.context_tokens
    assert turn2.stats.prefill_tokens < turn1.stats.context_tokens  # the first turn's context is not recomputed
    assert s.result is not None and s.result.finish_reason == "closed"
    with pytest.raises(NoSuchProcess):
        client.stat(pid)  # closed and reaped when the with ended


def test_every_write_joins_a_chat_sessions_history_so_each_turn_prefills_only_its_new_tokens(client, tiny_model):
    """A chat session begun with no message: each turn is rendered from the whole conversation, every earlier
    write included, and the KV of what is unchanged is kept (the writes were left out of the history: every
    turn recomputed it all, and the model never saw the earlier questions)."""
    from transformers import AutoTokenizer

    pid = client.spawn(model=tiny_model, session=True, max_new_tokens=3, **GREEDY)
    try:
        turns = [client.write(pid, text) for text in ("alpha one", "beta two", "gamma three")]
        rendered = AutoTokenizer.from_pretrained(tiny_model).decode(
            json.loads(client.fs.get(f"/proc/{pid}/prompt_ids")))
    finally:
        client.close(pid)
    assert rendered.index("alpha one") < rendered.index("beta two") < rendered.index("gamma three")
    for before, turn in zip(turns, turns[1:]):
        new = turn.stats.context_tokens - turn.stats.output_tokens - before.stats.context_tokens
        assert turn.stats.prefill_tokens <= new + 1, (before.stats, turn.stats)  # + the reply's last token


def test_a_session_on_a_model_without_a_chat_template_starts_with_no_prompt(client, tmp_path):
    path = make_tiny_llama(tmp_path / "plain-llama")
    config = path / "tokenizer_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "chat_template"}))
    for extra in path.glob("chat_template*"):
        extra.unlink()
    try:
        with client.session(model=str(path), system="ignored: no template", max_new_tokens=3, **GREEDY) as s:
            info = client.stat(s.pid)
            assert info.session and info.state == "BLOCKED" and info.prompt_tokens == 0
            assert isinstance(s.send("plain text"), str) and s.last.stats.output_tokens == 3
    finally:
        client.model_unload(str(path), force=True)


def test_a_session_is_closed_when_its_block_raises(client, tiny_model):
    with pytest.raises(RuntimeError):
        with client.session(model=tiny_model, max_new_tokens=4, **GREEDY) as s:
            s.send("hi")
            raise RuntimeError("the user's own error")
    with pytest.raises(NoSuchProcess):
        client.stat(s.pid)


def test_nobody_signals_or_renices_another_users_process_and_only_root_sets_a_negative_nice(kernel, long_model):
    with kernel.client_as("alice") as alice, kernel.client_as("bob") as bob:
        pid = alice.spawn(prompt="mine", model=long_model, max_new_tokens=100000, **GREEDY)
        try:
            for act in (lambda: bob.nice(pid, 5), lambda: bob.stop(pid), lambda: bob.cont(pid),
                        lambda: bob.kill(pid, "KILL")):
                with pytest.raises(NotPermitted):
                    act()
            with pytest.raises(NotPermitted):
                alice.nice(pid, -1)  # raising priority below 0 is the admin's
            assert alice.nice(pid, 3)["priority"] == 3  # lowering one's own is anyone's
            with kernel.client() as root:  # the tests run as root: the admin
                assert root.nice(pid, -2)["priority"] == -2
            c = llmos(kernel, "stop", str(pid), env=as_user(kernel, "bob"))
            assert c.returncode == 1 and "EPERM" in c.stderr and c.stderr.count("\n") == 1
            assert "Traceback" not in c.stderr
            assert alice.stat(pid).state in ("READY", "RUNNING")  # bob's signals changed nothing
        finally:
            end_and_reap(alice, pid)


def test_the_cli_renices_stops_and_continues_a_process(kernel, client, long_model):
    pid = client.spawn(prompt="cli", model=long_model, max_new_tokens=100000, **GREEDY)
    try:
        n = llmos(kernel, "nice", str(pid), "4")
        assert n.returncode == 0 and n.stdout.strip().startswith(f"pid {pid}: priority 4"), n.stderr
        s = llmos(kernel, "stop", str(pid))
        assert s.returncode == 0 and f"sent STOP to pid {pid}: it is STOPPED" in s.stdout, s.stderr
        assert state_of(client, pid) == "STOPPED"
        ps = llmos(kernel, "ps")
        row = next(ln.split() for ln in ps.stdout.splitlines() if ln.split()[0] == str(pid))
        assert row[1:3] == ["STOPPED", "4"]
        c = llmos(kernel, "kill", "-s", "CONT", str(pid))
        assert c.returncode == 0 and f"sent CONT to pid {pid}" in c.stdout, c.stderr
        wait_for(lambda: state_of(client, pid) in ("READY", "RUNNING"), what="the process to resume")
    finally:
        end_and_reap(client, pid)


def test_run_with_a_deadline_ends_with_etimedout_keeping_its_output(kernel, long_model):
    r = llmos(kernel, "run", "--model", long_model, "--deadline", "0.5", "--max-new-tokens", "100000",
              "--ignore-eos", "--temperature", "0", "-p", "3", "late")
    assert r.returncode == 1 and "deadline" in r.stderr, r.stderr
    assert len(r.stdout) > 1 and "Traceback" not in r.stderr, r.stderr  # the partial output was printed


def test_top_once_shows_the_processes_and_the_models(kernel, client, long_model):
    pid = client.spawn(prompt="top", model=long_model, max_new_tokens=100000, **GREEDY)
    try:
        wait_for(started(client, pid), what="the first token")
        t = llmos(kernel, "top", "-n", "1")
        assert t.returncode == 0, t.stderr
        assert t.stdout.count("llmos top - ") == 1 and "tok/s" in t.stdout and "KV USED/TOTAL" in t.stdout
        assert any(ln.split()[:2] == [str(pid), "RUNNING"] for ln in t.stdout.splitlines())
    finally:
        end_and_reap(client, pid)


def test_chat_reads_turns_from_piped_stdin_and_answers_as_a_session_does(kernel, client, tiny_model):
    with client.session(model=tiny_model, system="Be brief.", max_new_tokens=5, **GREEDY) as s:
        expected = [s.send("hi there"), s.send("tell me more")]
    before = {p.pid for p in client.ps()}
    # bytes: the tiny model's replies are arbitrary characters, a carriage return among them
    r = subprocess.run([*BIN, "chat", "--model", tiny_model, "--system", "Be brief.", "--max-new-tokens", "5",
                        "--temperature", "0", "--ignore-eos"], env={**kernel.env, "PYTHONIOENCODING": "utf-8"},
                       input=b"hi there\n\ntell me more\n", capture_output=True, timeout=120)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    assert r.stdout == "".join(t + "\n" for t in expected).encode()
    assert {p.pid for p in client.ps()} <= before  # the chat closed its session


def test_a_user_error_is_one_line_with_its_errno_and_a_failing_status(kernel):
    for args in (("nice", "987654", "3"), ("stop", "987654"), ("cont", "987654")):
        r = llmos(kernel, *args)
        assert r.returncode == 1 and "ESRCH" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""


def test_the_shell_renices_stops_continues_shows_top_and_chats(kernel, client, long_model, tiny_model):
    pid = client.spawn(prompt="shell", model=long_model, max_new_tokens=100000, **GREEDY)
    try:
        script = "\n".join([f"nice {pid} 6", f"stop {pid}", "ps", f"cont {pid}", "top", f"chat {tiny_model} -n 8 --temperature 0",
                            "hello", "", "/bye", "nice 987654 1", "exit"]) + "\n"
        r = subprocess.run([sys.executable, "-m", "llmos.shell"], env=kernel.env, input=script,
                           capture_output=True, text=True, timeout=120)
        out = r.stdout
        assert r.returncode == 0 and "Traceback" not in out + r.stderr, r.stderr
        assert f"pid {pid}: priority 6" in out and f"sent STOP to pid {pid}: it is STOPPED" in out
        assert any(ln.split()[:3] == [str(pid), "STOPPED", "6"] for ln in out.splitlines())
        assert f"sent CONT to pid {pid}" in out and "llmos top - " in out
        assert "[chat with session pid" in out and "[chat ended after 1 turns;" in out
        assert "error: " in out and "ESRCH" in out  # the shell went on after the chat
    finally:
        end_and_reap(client, pid)


def test_the_async_client_renices_stops_continues_and_holds_a_session(kernel, long_model, tiny_model):
    async def main():
        async with AsyncClient(kernel.address) as c:
            pid = await c.spawn(prompt="async", model=long_model, max_new_tokens=100000, **GREEDY)
            try:
                assert (await c.nice(pid, 2))["priority"] == 2
                assert await c.stop(pid) == "STOPPED"
                assert await c.cont(pid) in ("READY", "RUNNING")
            finally:
                await c.kill(pid, "KILL")
                await c.wait(pid)
            async with c.session(model=tiny_model, max_new_tokens=4, **GREEDY) as s:
                text = await s.send("hi")
                assert text == s.last.text and s.last.state == "BLOCKED"
                chunks = [t async for t in s.stream("more")]
                assert "".join(chunks) == s.last.text and s.last.stats.output_tokens == 4
            with pytest.raises(NoSuchProcess):
                await c.stat(s.pid)
    asyncio.run(main())


def test_chat_json_prints_one_object_per_turn_whatever_the_replies_hold(kernel, client, tiny_model):
    with client.session(model=tiny_model, max_new_tokens=40, **GREEDY) as s:
        expected = [s.send("hi there"), s.send("tell me more"), s.send("and more")]
    # 40 arbitrary characters of the tiny model per reply: plain mode cannot say where one reply ends
    r = subprocess.run([*BIN, "chat", "--json", "--model", tiny_model, "--max-new-tokens", "40", "--temperature",
                        "0", "--ignore-eos"], env={**kernel.env, "PYTHONIOENCODING": "utf-8"},
                       input=b"hi there\ntell me more\n\nand more\n", capture_output=True, timeout=120)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    lines = r.stdout.decode().split("\n")
    assert lines[-1] == "" and len(lines) == 4, lines  # one line per turn, each ended by a newline
    turns = [json.loads(ln) for ln in lines[:-1]]
    assert [t["text"] for t in turns] == expected
    assert len({t["pid"] for t in turns}) == 1 and all(t["finish_reason"] == "length" for t in turns)
    assert all(t["stats"]["output_tokens"] == 40 and t["error"] is None for t in turns)
