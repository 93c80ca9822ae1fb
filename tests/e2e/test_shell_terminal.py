"""llmos-shell in a real terminal (a pty), against the shared kernel: what the screen shows a user who chats,
completes with Tab, searches the history with Ctrl-R and looks at models, devices, metrics and top.

One shell process goes through all of it (a shell starts in about a second): each step waits for the
screen, with a deadline, never for a fixed time.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.ptyterm import Terminal

SHELL_PROMPT = re.compile(r"(?m)^llmos>$")  # an empty prompt: the shell waits for the next command
CHAT_PROMPT = re.compile(r"(?m)^>>>( Send a message \(/\? for help\))?$")


class Shell:
    """The terminal with the shell's prompts: ``do(line, *want)`` types a line and waits for each text of
    ``want`` below it, then for the next empty prompt."""

    def __init__(self, term: Terminal) -> None:
        self.t = term
        self.prompt = SHELL_PROMPT

    def do(self, line: str, *want: str | re.Pattern, prompt: re.Pattern | None = None, timeout: float = 30) -> str:
        at = self.t.mark()
        self.t.send(line + "\r")
        for w in want:
            self.t.wait_for(w, timeout, since=at)
        return self.t.wait_for(prompt or self.prompt, timeout, since=at + 1)


@pytest.fixture
def home():
    """The shell's own home (its history file), apart from the shared kernel's."""
    path = Path(tempfile.mkdtemp(prefix="llmos-shell-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def unique_prefix(pid: int, others: set[int]) -> str:
    """The shortest start of ``pid``'s digits that no other pid starts with ('' when it is the only one; all of
    them if none is): Tab must then add the rest."""
    text = str(pid)
    for n in range(len(text) + 1):
        if not any(str(o).startswith(text[:n]) for o in others if o != pid):
            return text[:n]
    return text


def test_a_user_at_a_terminal_chats_completes_searches_history_and_looks_at_the_kernel(kernel, client, tiny_model,
                                                                                        home):
    # a line from an earlier shell, in prompt_toolkit's history format: Ctrl-R must find it
    (home / "shell_history").write_text("\n# 2026-01-01 10:00:00.000000\n+dmesg -n 2\n")
    (home / "shell_history").chmod(0o600)
    blocked = client.spawn(model=tiny_model, session=True)  # a process whose pid Tab completes
    term = Terminal([sys.executable, "-m", "llmos.shell", "--home", str(home), "--address", kernel.address],
                    kernel.env)
    sh = Shell(term)
    try:
        term.wait_for(SHELL_PROMPT)

        # Tab completes a command, then a pid (with what it is); errors are one line and the shell goes on
        at = term.mark()
        term.send("devi\t")
        term.wait_for("llmos> devices", since=at)
        out = sh.do("", "DEVICE", "KIND", "MEMORY")
        assert re.search(r"(?m)^cpu\s+cpu\s+[\d,]+ MiB", out) and "cores, load" in out, out
        prefix = unique_prefix(blocked, {p.pid for p in client.ps()})
        at = term.mark()
        term.send(f"stat {prefix}\t")
        term.wait_for(f"llmos> stat {blocked}", since=at)
        out = sh.do("", re.compile(rf"pid: {blocked}\b"), "state: BLOCKED")
        out = sh.do("kill 987654", "error: [ESRCH]")
        assert "Traceback" not in out
        sh.do("frobnicate", "unknown command 'frobnicate'; type help")

        # models, metrics and top show tables a person reads
        name = tiny_model[-48:]
        out = sh.do("models", "MODEL", "KV USED/TOTAL", name)
        assert re.search(rf"{re.escape(name)}\s+cpu\s+\d+\s+pinned", out), out
        sh.do(f"load {tiny_model}", re.compile(rf"{re.escape(name)}\s+cpu\s+\d+\s+pinned"))  # loaded: at once
        sh.do("unload /no/such/model", "error: [E")
        sh.do("metrics", "LATENCY (ms)", re.compile(r"(?m)^ttft\s+[\d.-]+"), "TOK OUT")
        sh.do("top -n 1", "llmos top - ", "TOK/S", "PID  STATE")

        # Ctrl-R finds the earlier session's line; Enter runs it
        at = term.mark()
        term.send("\x12esg -n")
        term.wait_for("(reverse-i-search)`esg -n': dmesg -n 2", since=at)
        term.send("\r")
        out = term.wait_for(SHELL_PROMPT, since=at + 1)
        assert len([ln for ln in out.splitlines() if ln.startswith("[")]) == 2, out  # two log lines

        # chat: a session; /set, /system, multi-line, /show, /clear, /bye
        sh.prompt = CHAT_PROMPT
        out = sh.do(f"chat {tiny_model} -n 4 --temperature 0", "[chat with session pid ", "/bye to leave]")
        first = int(re.search(r"session pid (\d+)", out).group(1))
        sh.do("hello")
        first_context = client.stat(first).prompt_tokens
        sh.do("/set temperature 0.5", "Set parameter 'temperature' to '0.5'")
        sh.do("/set top_k -1", "error: [EINVAL] top_k must be >= 0; got -1")
        sh.do("/set temperature hot", "error: [EINVAL] temperature must be a number, got 'hot'")
        sh.do("/system Be brief.", "Set system message.")
        at = term.mark()
        term.send('"""first line\r')
        term.wait_for(re.compile(r"(?m)^\.\.\.$"), since=at)  # the continuation prompt
        sh.do('second line"""', "... second line\"\"\"")
        out = sh.do("/show", "parameters:", "session:  pid ", "system:   'Be brief.'",
                    re.compile(r"temperature\s+0\.5\n"), re.compile(r"max_new_tokens\s+4\n"), "2 turns")
        second = int(re.search(r"session:  pid (\d+)", out).group(1))
        assert second != first  # the settings changed: a fresh session...
        # ...holding the conversation: the system prompt, both turns and their replies
        second_context = client.stat(second).prompt_tokens
        assert second_context > first_context + len("Be brief.first line\nsecond line")
        sh.do("/load /no/such/model", "error: [E")  # the chat goes on, with its model
        sh.do("/clear", "Cleared session context")
        sh.do("again")
        out = sh.do("/show", "1 turns in the conversation")
        third = int(re.search(r"session:  pid (\d+)", out).group(1))
        assert third != second and client.stat(third).prompt_tokens < second_context - 10  # the context forgotten

        # Ctrl-C stops a long reply and the chat goes on
        sh.do("/set max_tokens 900", "Set parameter")
        sh.do("/set ignore_eos true", "Set parameter")
        term.send("go on\r")
        wait_for(lambda: any(p.session and p.state == "RUNNING" and p.output_tokens > 2 and p.pid > third
                             for p in client.ps()), 30, "the long reply to stream")
        at = term.mark()
        term.send("\x03")
        term.wait_for("[reply stopped]", since=at)
        term.wait_for(CHAT_PROMPT, since=at)
        out = sh.do("/bye", "[chat ended after 4 turns; session ", prompt=SHELL_PROMPT)
        live = [p.pid for p in client.ps() if p.session and p.pid not in (blocked,) and p.pid >= first]
        assert live == [], live  # every session the chat started was closed

        term.send("\x04")
        assert term.close() == 0
        history = (home / "shell_history").read_text()
        assert "+/system Be brief." in history and "+devices" in history  # kept for the next shell
        assert "Traceback" not in term.screen.text()
    finally:
        if term.proc.poll() is None:
            term.close(timeout=1)
        client.close(blocked)
