"""Perplexity of a model over a stored data set (``llmos eval``), with its report kept in the user's home.

Each record is scored by the kernel (the ``score`` syscall: the log-probability of each token given those
before it, a sliding window past the model's context). The records' negative log-likelihoods add up
and perplexity = exp(total nll / tokens scored); a record's first token has no context and is not scored,
so a model that adds a BOS token scores every real token. The report goes to
``/home/<user>/eval/<model>-<data>-<utc time>.json``.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import time
from typing import TYPE_CHECKING, Any, Callable

from llmos.syscalls.errors import InvalidArgument

if TYPE_CHECKING:
    from llmos.client import Client

Progress = Callable[[int, int, int], None]  # (records done, records in all, tokens scored so far)


def model_label(model: str | None) -> str:
    """A short name for a model in a file name: a store model's or a directory's last part ('default' for
    None), limited to [A-Za-z0-9_.+-]."""
    text = (model or "default").rstrip("/").rsplit("/", 1)[-1].removeprefix("store:") or "model"
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)[:64]


def evaluate(client: "Client", model: str | None, data: str, limit: int | None = None,
             progress: Progress | None = None, save: bool = True,
             clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Perplexity of ``model`` over data set ``data`` (its first ``limit`` records; None: all).

    Returns the report: {model (as resolved by the kernel), data, records, tokens (of the records), scored
    (tokens with a log-probability), nll (nats, summed), nll_per_token, perplexity, seconds, tokens_per_s,
    created (unix), path (where it was stored, when ``save``)}. Raises InvalidArgument when nothing can be
    scored (no record, or every record a single token), and what ``score`` and the data set's reads raise."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise InvalidArgument(f"limit must be a whole number >= 1, not {limit!r}")
    n = client.data.count(data)
    todo = n if limit is None else min(n, limit)
    t0 = clock()
    nll, scored, tokens, done, resolved = 0.0, 0, 0, 0, model
    for text in client.data.iter(data, 0, todo):
        r = client.score(text, model)
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
        stamp = datetime.datetime.fromtimestamp(created, datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = f"/home/{client.user}/eval/{model_label(resolved)}-{data}-{stamp}.json"
        client.fs.put(path, json.dumps(report, indent=2).encode())
        report["path"] = path
    return report
