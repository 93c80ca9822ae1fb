"""The kernel's log lines stay small whatever a client sends."""

import io
import json

from llmos.kernel.log import FIELD_CHARS, Logger, bounded


def test_every_field_of_a_log_line_is_bounded():
    out = io.StringIO()
    Logger("t", stream=out).info("spawn", owner="u" * 8_000_000, ids=list(range(1_000_000)),
                                 nested={"k": "v" * 100_000}, pid=3, ok=True)
    line = out.getvalue()
    assert len(line) < 10 * FIELD_CHARS
    rec = json.loads(line)
    assert rec["pid"] == 3 and rec["ok"] is True and "8000000 characters" in rec["owner"]


def test_small_fields_are_logged_as_they_are():
    assert bounded("alice") == "alice" and bounded([1, 2]) == [1, 2] and bounded(None) is None
