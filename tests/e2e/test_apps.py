"""The seed's applications (`llmos app ...`) on tiny models: the prompts the kernel receives are the documented
ones, long inputs are split into parts that fit the context, output streams, input comes from files and stdin,
bad input is one error line. Mechanics, not quality: the tiny models' text is noise.

The tiny models' tokenizer gives one token per byte (tests/tinymodel.py), so a prompt's token count is the
byte length of the text the kernel rendered, and a part's size is known exactly here.
"""

from __future__ import annotations

import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys

import pytest

from llmos.apps import chunking
from llmos.apps.chat import SYSTEM
from llmos.apps.qa import qa_prompt
from llmos.apps.summarize import MARGIN, combine_all, combine_prompt, summarize_prompt
from llmos.apps.translate import translate_prompt
from llmos.cli import main as cli_main
from llmos.syscalls.errors import NoSuchProcess

BIN = [sys.executable, "-m", "llmos", "app"]
PLAIN_CONTEXT = 512


def blen(text: str) -> int:
    """Tokens of ``text`` under the tiny models' byte-level tokenizer (no special tokens in it)."""
    return len(text.encode("utf-8"))


def rendered(model: str, messages: list[dict]) -> str:
    """``messages`` as the model's chat template renders them for generation (the kernel's rendering)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model).apply_chat_template(messages, add_generation_prompt=True,
                                                                    tokenize=False)


def chat_tokens(model: str, messages: list[dict]) -> int:
    """Tokens of ``messages`` rendered by the model's chat template (its markers are special tokens, one each)."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model)(rendered(model, messages), add_special_tokens=False)["input_ids"])


def as_in_a_terminal() -> None:
    """A command started from a terminal has Ctrl-C's default disposition (a background test run may not)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def app_json(capsys, kernel, *argv: str) -> dict:
    """``llmos app ... --json`` run in this process; its one JSON object."""
    code = cli_main(["app", *argv, "--address", kernel.address, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def plain_model(kernel, tiny_model, tmp_path_factory) -> str:
    """The tiny model with no chat template and a context of PLAIN_CONTEXT tokens (a copy, its config and
    tokenizer config edited), loaded on the shared kernel for this module; the kernel unloads it a few seconds
    after its last use (keep_alive), so that nothing waits for its worker to stop."""
    path = tmp_path_factory.mktemp("apps") / "plain-llama"
    shutil.copytree(tiny_model, path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    for name, edit in (("tokenizer_config.json", lambda c: c.pop("chat_template", None)),
                       ("config.json", lambda c: c.update(max_position_embeddings=PLAIN_CONTEXT))):
        config = json.loads((path / name).read_text())
        edit(config)
        (path / name).write_text(json.dumps(config))
    with kernel.client() as admin:
        admin.model_load(str(path), keep_alive=5)
    return str(path)


# -- pure parts: splitting and combining (token counts are characters here) ------------------------------------
PARAS = [f"Paragraph {i} tells of the kernel. It runs model {i}, and its processes hold KV blocks." for i in range(12)]


def test_split_keeps_whole_paragraphs_in_parts_within_the_budget():
    text = "\n\n".join(PARAS)
    parts = chunking.split(text, 200, len)
    assert len(parts) > 1 and all(len(p) <= 200 for p in parts)
    assert "\n\n".join(parts) == text  # nothing lost, and every cut between two paragraphs
    assert all(p.split("\n\n")[0] in PARAS for p in parts)


def test_split_cuts_a_long_paragraph_at_sentences_then_at_spaces_and_still_fits_when_estimates_are_low():
    para = " ".join(PARAS[:4]) + " " + "word " * 60
    under = chunking.ratio_estimate(para, len(para), slack=0.5)  # says half the real size
    parts = chunking.split(para, 60, len, under)
    assert all(len(p) <= 60 for p in parts) and "".join(parts).replace(" ", "") == para.replace(" ", "")
    assert parts[0] == "Paragraph 0 tells of the kernel."  # a sentence: the next one would not fit with it
    assert all(not p.startswith("ord") for p in parts)  # words are not cut: pieces end after a space


def test_combining_summaries_that_do_not_fit_together_goes_round_by_round_until_one_call_takes_them():
    calls: list[tuple[str, str]] = []

    def combine(text: str, label: str) -> str:
        calls.append((label, text))
        return text[:30]

    summaries = [f"{i:02d}" + "s" * 80 for i in range(10)]  # each over half the budget: cut to it first
    final, rounds = combine_all(summaries, 100, len, combine)
    assert rounds == 3 and calls[-1][0] == "combine" and final == calls[-1][1][:30]
    assert all(len(text) <= 100 for _, text in calls)
    first = [text for label, text in calls if label.startswith("round 1 ")]
    assert len(first) == 5 and first[0].startswith("00") and "\n\n01" in first[0]  # in order, a blank line apart
    assert all(len(s) <= 100 // 2 - MARGIN for text in first for s in text.split("\n\n"))


# -- the apps against the kernel -----------------------------------------------------------------------------
def test_translate_sends_the_documented_prompt_and_streams_its_output_before_the_process_ends(
        kernel, client, long_model, tmp_path):
    source = tmp_path / "letter.txt"
    source.write_text("Dear kernel,\nplease keep my context.\n")
    app = subprocess.Popen([*BIN, "translate", "--to", "fr", "--from", "English", "--model", long_model, "-v",
                            "--max-new-tokens", "100000", "--ignore-eos", str(source)], env=kernel.env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=as_in_a_terminal)
    try:
        line = app.stderr.readline().decode()
        assert line.startswith("[pid ") and line.endswith(": translation]\n"), line + app.stderr.read().decode()
        pid = int(line[5:].split(":")[0])
        ready, _, _ = select.select([app.stdout], [], [], 60)  # a deadline, not a wait forever on a buffering app
        assert ready and os.read(app.stdout.fileno(), 1)  # text has arrived while the process is still generating
        assert client.stat(pid).state in ("READY", "RUNNING")
        got = json.loads(client.fs.get(f"/proc/{pid}/prompt_ids"))
        expected = translate_prompt("Dear kernel,\nplease keep my context.", "French", "English")
        assert expected.messages[0]["content"].startswith("Translate the following text from English into French. "
                                                          "Reply with the translation only.\n\nDear kernel,")
        assert _decode(long_model, got) == rendered(long_model, expected.messages)
        app.send_signal(signal.SIGTERM)  # the app ends its process first, then exits as SIGTERM says
        out, err = app.communicate(timeout=60)
        assert app.returncode == 143 and b"Traceback" not in err, err
        with pytest.raises(NoSuchProcess):
            client.stat(pid)  # ended and reaped: the app leaves nothing behind
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()


def _decode(model: str, ids: list[int]) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model).decode(ids)


def test_generate_reads_files_then_stdin_as_one_user_message(kernel, tiny_model, tmp_path, monkeypatch, capsys):
    first = tmp_path / "a.txt"
    first.write_text("Write a poem\n")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"about the kernel.\n")))
    out = app_json(capsys, kernel, "generate", "--model", tiny_model, "--max-new-tokens", "3", str(first), "-")
    [call] = out["calls"]
    text = "Write a poem\n\nabout the kernel."
    assert call["prompt_tokens"] == chat_tokens(tiny_model, [{"role": "user", "content": text}])
    assert out["finish_reason"] == "length" and call["output_tokens"] == 3


def test_qa_takes_its_context_from_a_stored_data_set(kernel, client, tiny_model, tmp_path, capsys):
    facts = tmp_path / "facts.txt"
    facts.write_text("The kernel runs on Linux.\nIts pid is 42.\n")
    client.data.import_file(facts, "apps-facts")
    try:
        out = app_json(capsys, kernel, "qa", "--context-data", "apps-facts", "--model", tiny_model,
                       "--max-new-tokens", "2", "What is the pid?")
    finally:
        client.data.rm("apps-facts")
    prompt = qa_prompt("The kernel runs on Linux.\n\nIts pid is 42.", "What is the pid?")
    assert prompt.messages[0]["content"].endswith("Context:\nThe kernel runs on Linux.\n\nIts pid is 42.\n\n"
                                                  "Question: What is the pid?")
    [call] = out["calls"]
    assert call["prompt_tokens"] == chat_tokens(tiny_model, prompt.messages)


def test_summarize_splits_a_long_text_into_parts_that_fit_the_context_with_the_plain_prompt(
        kernel, plain_model, tmp_path, capsys):
    text = "\n\n".join(PARAS[:7])
    doc = tmp_path / "long.txt"
    doc.write_text(text + "\n")
    room = 4
    out = app_json(capsys, kernel, "summarize", "--model", plain_model, "--max-new-tokens", str(room),
                   "--ignore-eos", "--temperature", "0", str(doc))
    plan, calls = out["plan"], out["calls"]
    # the model has no chat template: the documented plain prompts, the probes with an empty text
    probes = [c for c in calls if c["purpose"] == "probe"]
    assert [c["prompt_tokens"] for c in probes] == [blen(summarize_prompt("").plain), blen(combine_prompt("").plain)]
    assert plan["context"] == PLAIN_CONTEXT
    assert plan["part_room"] == room
    assert plan["part_budget"] == PLAIN_CONTEXT - probes[0]["prompt_tokens"] - room - MARGIN
    assert blen(text) > plan["part_budget"]
    # the parts are whole paragraphs, and each prompt the kernel counted is the documented one, within the context
    parts = chunking.split(text, plan["part_budget"], blen, chunking.ratio_estimate(text, blen(text)))
    assert plan["parts"] == len(parts) > 1 and "\n\n".join(parts) == text
    mapped = [c for c in calls if c["purpose"].startswith("part ")]
    assert [c["prompt_tokens"] for c in mapped] == [blen(summarize_prompt(p).plain) for p in parts]
    assert all(c["prompt_tokens"] + room <= PLAIN_CONTEXT for c in calls)
    assert calls[-1]["purpose"] == "combine" and plan["rounds"] == 1 and out["text"] is not None


def test_chat_sends_each_line_as_a_turn_of_one_session_after_the_system_prompt(kernel, tiny_model, monkeypatch,
                                                                                capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello\n\nsecond line\n/exit\nnever sent\n")))
    code = cli_main(["app", "chat", "--address", kernel.address, "--model", tiny_model, "--max-new-tokens", "2",
                     "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    turns = [json.loads(line) for line in out.splitlines()]
    assert len(turns) == 2 and turns[0]["pid"] == turns[1]["pid"]  # one session; the empty line skipped
    system = {"role": "system", "content": SYSTEM}
    assert turns[0]["stats"]["prefill_tokens"] == chat_tokens(tiny_model, [system, {"role": "user",
                                                                                     "content": "hello"}])


@pytest.mark.parametrize("argv, stdin, errno, says", [
    (["translate", "--to", "Klingonese"], "hi", "EINVAL", "unknown language 'Klingonese'"),
    (["translate", "--to", "fr", "/nonexistent/input.txt"], "", "ENOENT", "/nonexistent/input.txt: no such file"),
    (["summarize"], " \n\n", "EINVAL", "stdin is empty"),
    (["generate", "/"], "", "EINVAL", "/ is a directory"),
    (["qa", "Why?"], "", "EINVAL", "give the context: --context FILE or --context-data NAME"),
    (["qa", "--context-data", "apps-no-such-set", "Why?"], "", "ENOENT", "no data set 'apps-no-such-set'"),
])
def test_bad_input_is_one_error_line(kernel, tiny_model, monkeypatch, capsys, argv, stdin, errno, says):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
    code = cli_main(["app", *argv, "--address", kernel.address, "--model", tiny_model])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"llmos: [{errno}] ") and says in err, err


def test_an_input_over_the_context_is_one_error_line_from_the_kernel(kernel, tiny_model, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"w" * 2000)))
    code = cli_main(["app", "translate", "--to", "de", "--address", kernel.address, "--model", tiny_model])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith("llmos: [E2BIG] "), err
