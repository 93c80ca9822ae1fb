"""Perplexity of a model over a stored data set (``llmos eval``), with its report kept in the user's home.

Each record is scored by the kernel (the ``score`` syscall: the log-probability of each token given those
before it, a sliding window past the model's context). The records' negative log-likelihoods add up
and perplexity = exp(total nll / tokens scored); a record's first token has no context and is not scored,
so a model that adds a BOS token scores every real token. The report goes to
``/home/<user>/eval/<label>-<data>-<utc time, microseconds>.json`` (a ``-2``, ``-3``... suffix if taken), the
label saying what the model was: ``store-<name>`` or ``dir-<directory name>``.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import time
from typing import TYPE_CHECKING, Any, Callable

from llmos.syscalls.errors import DeviceError, InvalidArgument, TryAgain

if TYPE_CHECKING:
    from llmos.client import Client

Progress = Callable[[int, int, int], None]  # (records done, records in all, tokens scored so far)
RETRIES = 4  # a record whose score fails EIO (its worker crashed: the kernel restarts it) or EAGAIN is retried
RETRY_WAIT_S = 0.5  # first wait before a retry; doubles each time


def model_label(model: str | None) -> str:
    """A short name for a (resolved) model in a file name, telling a store model from a directory:
    ``store-<name>`` for ``store:/models/<name>``, ``dir-<last part>`` for a directory ('default' for None),
    limited to [A-Za-z0-9_.+-]."""
    if model is None:
        return "default"
    kind, text = ("store", model.removeprefix("store:")) if model.startswith("store:") else ("dir", model)
    text = text.rstrip("/").rsplit("/", 1)[-1] or "model"
    return f"{kind}-" + re.sub(r"[^A-Za-z0-9_.+-]", "_", text)[:64]


def _score(client: "Client", text: str, model: str | None, sleep: Callable[[float], None]) -> dict[str, Any]:
    """``client.score``, retried RETRIES times on EIO (a crashed worker, restarted by the kernel) and EAGAIN."""
    wait = RETRY_WAIT_S
    for attempt in range(RETRIES + 1):
        try:
            return client.score(text, model)
        except (DeviceError, TryAgain):
            if attempt == RETRIES:
                raise
            sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def evaluate(client: "Client", model: str | None, data: str, limit: int | None = None,
             progress: Progress | None = None, save: bool = True,
             clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Perplexity of ``model`` over data set ``data`` (its first ``limit`` records; None: all).

    Returns the report: {model (as resolved by the kernel), data, records, tokens (of the records), scored
    (tokens with a log-probability), nll (nats, summed), nll_per_token, perplexity, seconds, tokens_per_s,
    created (unix), path (where it was stored, when ``save``)}. ``seconds`` and ``tokens_per_s`` time the
    scoring only: the model is loaded and warmed with one short score first. A record whose score fails
    EIO (its worker crashed) or EAGAIN is retried after a short wait, RETRIES times. Raises InvalidArgument
    when nothing can be scored (no record, or every record a single token), and what ``score`` and the data
    set's reads raise."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise InvalidArgument(f"limit must be a whole number >= 1, not {limit!r}")
    n = client.data.count(data)
    todo = n if limit is None else min(n, limit)
    if todo:
        _score(client, "warm up", model, sleep)  # loads the model: the load is not scoring, keep it out of seconds
    t0 = clock()
    nll, scored, tokens, done, resolved = 0.0, 0, 0, 0, model
    for text in client.data.iter(data, 0, todo):
        r = _score(client, text, model, sleep)
        nll += r["nll"]
        scored += len(r["logprobs"])
        tokens += r["tokens"]
        resolved = r["model"]
        done += 1
        if progress is not None:
            progress(done, todo, scored)
    seconds = clock() - t0
    if scored == 0:
        raise InvalidArgument(f"nothing to score in data set {data!r}: "
                              + ("it has no records" if todo == 0 else "every record is a single token"))
    created = time.time()
    report = {"model": resolved, "data": data, "records": done, "tokens": tokens, "scored": scored, "nll": nll,
              "nll_per_token": nll / scored, "perplexity": math.exp(nll / scored), "seconds": seconds,
              "tokens_per_s": scored / seconds if seconds > 0 else 0.0, "created": created}
    if save:
        stamp = datetime.datetime.fromtimestamp(created, datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        base = f"/home/{client.user}/eval/{model_label(resolved)}-{data}-{stamp}"
        path, n = f"{base}.json", 1
        while client.fs.exists(path):  # two evals in the same microsecond (two machines' clients): no overwrite
            n += 1
            path = f"{base}-{n}.json"
        client.fs.put(path, json.dumps(report, indent=2).encode())
        report["path"] = path
    return report
