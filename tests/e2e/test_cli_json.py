"""``--json`` on every command that prints data, read back by a program; the same commands for people; the
sampling flags the kernel receives (run in this process, against the shared kernel)."""

import json
import os
import tempfile
from pathlib import Path

from tests.e2e.test_cli_fs import llmos


def out(r):
    assert r.returncode == 0, r.stderr
    return r.stdout.decode()


def test_process_commands_print_json_a_program_reads_and_text_for_people(kernel, client, long_model):
    env = kernel.env
    pid = client.spawn(prompt="p", model=long_model, max_new_tokens=100000, ignore_eos=True)
    try:
        st = json.loads(out(llmos(env, "stat", str(pid), "--json")))
        assert st["pid"] == pid and st["owner"] == "root" and st["state"] in ("READY", "RUNNING")
        human = out(llmos(env, "stat", str(pid)))
        assert f"pid: {pid}" in human and "owner: root" in human and "{" not in human.split("\n\n")[0]
        assert json.loads(out(llmos(env, "nice", str(pid), "5", "--json"))) == \
            {"pid": pid, "priority": 5, "state": client.stat(pid).state}
        stop = json.loads(out(llmos(env, "stop", str(pid), "--json")))
        assert (stop["signal"], stop["state"], stop["pid"]) == ("STOP", "STOPPED", pid)
        cont = json.loads(out(llmos(env, "cont", str(pid), "--json")))
        assert (cont["before"], cont["signal"]) == ("STOPPED", "CONT") and "resuming" in cont["message"]
        kill = json.loads(out(llmos(env, "kill", str(pid), "KILL", "--json")))
        assert (kill["signal"], kill["state"]) == ("KILL", "ZOMBIE")
        again = llmos(env, "stop", str(pid), "--json")  # an ended process: the kernel's one error line, no JSON
        assert again.returncode == 1 and "[EINVAL]" in again.stderr and again.stdout == b""
    finally:
        client.kill(pid, "KILL")
        client.wait(pid)


def test_model_and_kernel_commands_print_json_and_text(kernel, tiny_model, tmp_path):
    env = kernel.env
    info = json.loads(out(llmos(env, "model-info", tiny_model, "--json")))
    assert info["loaded"] is True and info["executors"][0]["ready"] is True
    human = out(llmos(env, "model-info", tiny_model))
    assert human.startswith(f"model {info['model']}: loaded") and "memory per instance:" in human and \
        "instance w" in human and ", ready," in human
    m = json.loads(out(llmos(env, "metrics", "--json")))
    assert "finished" in m and "models" in m
    shown = out(llmos(env, "metrics"))  # for people: the shell's tables
    assert shown.startswith("processes: ") and "LATENCY (ms)" in shown and "TOK OUT" in shown
    away = {**env, "LLMOS_ADDRESS": f"ipc://{tmp_path}/none.sock"}
    assert json.loads(out(llmos(away, "kernel", "stop", "--json")))["stopped"] is False


def test_store_and_user_removals_print_json(kernel):
    from llmos.syscalls.keys import make_key_pair

    env = kernel.env
    with tempfile.TemporaryDirectory(prefix="llmos-cli-json-") as tmp:
        src = Path(tmp) / "d.txt"
        src.write_text("one\ntwo\n")
        out(llmos(env, "data", "import", str(src), "--name", "cli-json-d"))
        assert json.loads(out(llmos(env, "data", "rm", "cli-json-d", "--json")))["name"] == "cli-json-d"
        public, _ = make_key_pair(Path(tmp) / "keys", "client")
        out(llmos(env, "user", "add", "cli-json-u", "--key", str(public)))
        assert json.loads(out(llmos(env, "user", "rm", "cli-json-u", "--json"))) == {"user": "cli-json-u", "removed": 1}


def test_run_json_prints_the_result_and_the_sampling_flags_reach_the_kernel(kernel, client, tiny_model):
    env = kernel.env
    greedy = dict(model=tiny_model, temperature=0.0, max_new_tokens=12, ignore_eos=True)
    ref = client.wait(client.spawn(prompt="aaaa", **greedy))  # the tiny model repeats itself: 'x' x 6, then others
    flags = ["--model", tiny_model, "--temperature", "0", "--max-new-tokens", "12", "--ignore-eos"]
    r = json.loads(out(llmos(env, "run", "--json", *flags, "aaaa")))
    assert (r["text"], r["token_ids"], r["finish_reason"]) == (ref.text, ref.token_ids, "length")
    # --stop-token-id: the output ends at that token (its first place in the greedy output)
    stop_id = ref.token_ids[6]
    cut = json.loads(out(llmos(env, "run", "--json", *flags, "--stop-token-id", str(stop_id), "aaaa")))
    assert cut["finish_reason"] == "stop" and cut["token_ids"][:-1] == ref.token_ids[:ref.token_ids.index(stop_id)]
    # --repetition-penalty: the same output as a client asking for it, and not the one without it
    pen = client.wait(client.spawn(prompt="aaaa", repetition_penalty=50.0, **greedy))  # no more 'x' x 6
    got = json.loads(out(llmos(env, "run", "--json", *flags, "--repetition-penalty", "50", "aaaa")))
    assert got["token_ids"] == pen.token_ids != ref.token_ids
