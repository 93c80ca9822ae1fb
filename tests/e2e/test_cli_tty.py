"""On a terminal, ``llmos run`` and ``llmos load`` show a spinner with the stage on stderr, erased before the
first token; piped, stderr carries no spinner and no control codes."""

import os
import select
import subprocess
import sys
import time

BIN = [sys.executable, "-m", "llmos"]


def on_a_tty(argv, env, timeout=60):
    """Run ``llmos ARGV`` with stdout and stderr on one pseudo-terminal: (exit status, all it wrote, in order)."""
    main_fd, sub_fd = os.openpty()
    try:
        proc = subprocess.Popen([*BIN, *argv], env=env, stdin=subprocess.DEVNULL, stdout=sub_fd, stderr=sub_fd,
                                start_new_session=True)
        os.close(sub_fd)
        chunks, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([main_fd], [], [], 1)[0]:
                try:
                    chunk = os.read(main_fd, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        return proc.wait(timeout=10), b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(main_fd)


ERASE = "\x1b[2K"  # erase the line: how the spinner goes


def test_run_on_a_terminal_shows_the_stage_and_erases_it_before_the_text(kernel, client, tiny_model):
    greedy = ["--model", tiny_model, "--temperature", "0", "--max-new-tokens", "6", "--ignore-eos"]
    code, shown = on_a_tty(["run", *greedy, "aaaa"], kernel.env)
    assert code == 0, shown
    stages = ("connecting to the kernel", "starting the process", "waiting in queue", "prefill")
    assert any(f"{stage}" in shown for stage in stages), shown  # whichever the spinner's first frame caught
    ref = client.wait(client.spawn(prompt="aaaa", model=tiny_model, temperature=0.0, max_new_tokens=6,
                                   ignore_eos=True)).text
    # after the spinner's last erase comes the text, and nothing of the spinner
    before, after = shown.rsplit(ERASE, 1)
    assert after.replace("\r\n", "\n") == ref + "\n" and "\x1b" not in after, (after, ref)
    assert any(stage in before for stage in stages) and not any(stage in after for stage in stages)

    piped = subprocess.run([*BIN, "run", *greedy, "aaaa"], env=kernel.env, capture_output=True, text=True,
                           timeout=60)
    assert piped.returncode == 0 and piped.stdout == ref + "\n" and piped.stderr == ""


def test_load_on_a_terminal_shows_the_model_it_loads_and_piped_only_its_table(kernel, tiny_model):
    code, shown = on_a_tty(["load", tiny_model], kernel.env)
    assert code == 0 and f"loading model {os.path.basename(tiny_model)}" in shown and ERASE in shown, shown
    piped = subprocess.run([*BIN, "load", tiny_model], env=kernel.env, capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and piped.stderr == "" and piped.stdout.startswith("MODEL ")
