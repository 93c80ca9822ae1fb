"""A program in a real pseudo-terminal, and the screen a user would see: for tests of interactive programs.

``Terminal(argv, env)`` starts the program with a pty as its controlling terminal (ROWS x COLS), Ctrl-C's
default disposition and its own session. ``send(keys)`` types; ``wait_for(text)`` reads its output into a
small VT100 screen until ``text`` is on it (or in what scrolled off) or the deadline passes: never a
fixed sleep. The screen understands what line editors (prompt_toolkit, rich) write: printable text (wide
characters take two cells), CR/LF/BS/TAB, cursor moves (CUU/CUD/CUF/CUB/CHA/CUP), erases (EL/ED), scroll
at the bottom; colours, modes and OSC titles are skipped.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time

from wcwidth import wcwidth

ROWS, COLS = 40, 160
CSI = re.compile(r"\x1b\[([?>=!]?)([0-9;]*)([ -/]*)([@-~])")
OSC = re.compile(r"\x1b\][^\x07\x1b]*(\x07|\x1b\\)")


class Screen:
    """The cells of a ROWS x COLS terminal and the lines scrolled off its top."""

    def __init__(self, rows: int = ROWS, cols: int = COLS) -> None:
        self.rows, self.cols = rows, cols
        self.cells = [[" "] * cols for _ in range(rows)]
        self.scrolled: list[str] = []
        self.y = self.x = 0
        self._pending = ""  # an escape sequence cut between two reads

    def _line_feed(self) -> None:
        if self.y == self.rows - 1:
            self.scrolled.append("".join(self.cells.pop(0)).rstrip())
            self.cells.append([" "] * self.cols)
        else:
            self.y += 1

    def _put(self, ch: str) -> None:
        w = wcwidth(ch)
        if w <= 0:
            return  # combining marks and non-printing characters take no cell
        if self.x + w > self.cols:  # auto-wrap
            self.x = 0
            self._line_feed()
        self.cells[self.y][self.x] = ch
        if w == 2 and self.x + 1 < self.cols:
            self.cells[self.y][self.x + 1] = ""
        self.x += w

    def _csi(self, private: str, params: str, final: str) -> None:
        nums = [int(p) if p else 0 for p in params.split(";")] if params else []
        n = max(1, nums[0]) if nums else 1
        if private:
            return  # modes (?25l, ?7h...): nothing drawn
        if final == "A":
            self.y = max(0, self.y - n)
        elif final == "B":
            self.y = min(self.rows - 1, self.y + n)
        elif final == "C":
            self.x = min(self.cols - 1, self.x + n)
        elif final == "D":
            self.x = max(0, self.x - n)
        elif final == "G":
            self.x = min(self.cols - 1, n - 1)
        elif final in "Hf":
            row = nums[0] if nums else 1
            col = nums[1] if len(nums) > 1 else 1
            self.y, self.x = min(self.rows, max(1, row)) - 1, min(self.cols, max(1, col)) - 1
        elif final == "K":
            mode = nums[0] if nums else 0
            row = self.cells[self.y]
            lo, hi = {0: (self.x, self.cols), 1: (0, self.x + 1), 2: (0, self.cols)}.get(mode, (0, 0))
            row[lo:hi] = [" "] * (hi - lo)
        elif final == "J":
            mode = nums[0] if nums else 0
            if mode == 0:
                self.cells[self.y][self.x:] = [" "] * (self.cols - self.x)
                for r in range(self.y + 1, self.rows):
                    self.cells[r] = [" "] * self.cols
            elif mode == 1:
                for r in range(self.y):
                    self.cells[r] = [" "] * self.cols
                self.cells[self.y][:self.x + 1] = [" "] * (self.x + 1)
            else:
                self.cells = [[" "] * self.cols for _ in range(self.rows)]
        # colours (m), scroll regions and the rest draw nothing here

    def feed(self, data: str) -> None:
        data = self._pending + data
        self._pending = ""
        i = 0
        while i < len(data):
            ch = data[i]
            if ch == "\x1b":
                rest = data[i:]
                m = CSI.match(rest) or OSC.match(rest)
                if m:
                    if m.re is CSI:
                        self._csi(m.group(1), m.group(2), m.group(4))
                    i += m.end()
                    continue
                if len(rest) < 64 and (rest.startswith("\x1b[") or rest.startswith("\x1b]") or len(rest) == 1):
                    self._pending = rest  # the sequence's end is in the next read
                    return
                i += 2  # ESC and one character (ESC =, ESC >, ESC 7...): nothing drawn
                continue
            if ch == "\r":
                self.x = 0
            elif ch == "\n":
                self._line_feed()
            elif ch == "\b":
                self.x = max(0, self.x - 1)
            elif ch == "\t":
                self.x = min(self.cols - 1, (self.x // 8 + 1) * 8)
            elif ch >= " " and ch != "\x7f":
                self._put(ch)
            i += 1

    def lines(self) -> list[str]:
        """The visible rows, trailing blanks cut."""
        return ["".join(row).rstrip() for row in self.cells]

    def text(self) -> str:
        """Everything shown: what scrolled off the top, then the visible rows."""
        return "\n".join(self.scrolled + self.lines()).rstrip()


class Terminal:
    """A program running in a pty, seen through a Screen."""

    def __init__(self, argv: list[str], env: dict[str, str], rows: int = ROWS, cols: int = COLS) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

        def child_setup() -> None:  # runs after setsid(): the pty becomes this session's controlling terminal
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # as from a terminal (a test run may have it ignored)

        env = {**env, "TERM": "xterm", "COLUMNS": str(cols), "LINES": str(rows),
               "PROMPT_TOOLKIT_NO_CPR": "1"}  # no cursor-position request: its answer would race with our keys
        self.proc = subprocess.Popen(argv, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                     preexec_fn=child_setup, close_fds=True)
        os.close(slave)
        self.fd = master
        self.screen = Screen(rows, cols)
        self.raw: list[str] = []
        self._decoder = __import__("codecs").getincrementaldecoder("utf-8")("replace")

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def _read(self, wait: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], wait)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the program closed the terminal (it ended)
            data = b""
        if not data:
            return False
        text = self._decoder.decode(data)
        self.raw.append(text)
        self.screen.feed(text)
        return True

    def wait_for(self, want: str | re.Pattern, timeout: float = 20.0, since: int = 0) -> str:
        """Read until ``want`` (text, or a compiled pattern) is on the screen (or scrolled off it), on line
        ``since`` (a ``mark()``) or below; returns those lines. AssertionError with the screen when ``timeout``
        seconds pass first."""
        deadline = time.monotonic() + timeout
        while True:
            tail = "\n".join((self.screen.scrolled + self.screen.lines())[since:])
            if (want.search(tail) if isinstance(want, re.Pattern) else want in tail):
                return tail
            left = deadline - time.monotonic()
            if left <= 0 or (not self._read(min(left, 0.2)) and self.proc.poll() is not None):
                raise AssertionError(f"{want!r} not on the screen after {timeout} s "
                                     f"(exit {self.proc.poll()}):\n{self.screen.text()}")

    def mark(self) -> int:
        """The cursor's line, counted from the first line shown: ``wait_for(..., since=mark)`` looks only at it
        and what is below (a program redraws at and below its cursor, never above)."""
        return len(self.screen.scrolled) + self.screen.y

    def close(self, timeout: float = 10.0) -> int:
        """Wait for the program to end (killing it if it does not in ``timeout`` s); its exit status."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.fd)
        return self.proc.returncode
