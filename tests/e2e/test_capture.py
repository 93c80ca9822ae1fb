"""Captured intermediates end to end: a real kernel, its store, a real tiny model; spawn with capture, read the
arrays back through the client, the caps' warnings, and bad requests."""

import numpy as np
import pytest

from llmos import LLMOS, Client, InvalidArgument, NotFound, NotPermitted
from tests.conftest import KernelProc, wait_for

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def test_a_process_captures_tensors_read_back_as_numpy_arrays_and_its_output_is_unchanged(kernel, client, tiny_model):
    plain = client.wait(client.spawn("the kernel", model=tiny_model, max_new_tokens=12, **GREEDY))
    pid = client.spawn("the kernel", model=tiny_model, max_new_tokens=12, **GREEDY,
                       capture=["attentions", "hidden_states"], capture_heads=[2, 0])
    r = client.wait(pid)  # reaps the process; its capture stays
    assert r.token_ids == plain.token_ids and r.warnings == []
    t = r.stats.prompt_tokens + len(r.token_ids) - 1  # the last token is sampled, never fed back
    for layer in (0, 1):
        a = client.capture(pid, "attentions", layer)
        assert a.shape == (t, 2, t) and a.dtype == np.float32
        assert np.allclose(a.sum(-1), 1.0, atol=1e-5) and not np.triu(a.transpose(1, 0, 2), k=1).any()
    with LLMOS(address=kernel.address, start_kernel=False) as os_:
        for layer in (0, 1, 2):
            assert os_.capture(pid, "hidden_states", layer).shape == (t, 32)
    with pytest.raises(NotFound):
        client.capture(pid, "attentions", 2)  # a model of 2 layers has attention layers 0 and 1
    with kernel.client_as("mallory") as other, pytest.raises(NotPermitted):
        other.capture(pid, "hidden_states", 0)


def test_a_streamed_process_has_its_capture_stored_when_its_stream_ends(client, tiny_model):
    pid = client.spawn("stream", model=tiny_model, max_new_tokens=5, **GREEDY, capture=["hidden_states"],
                       capture_layers=[2])
    stream = client.stream(pid)
    list(stream)
    assert stream.result.warnings == []
    assert client.capture(pid, "hidden_states", 2).shape[0] == stream.result.stats.prompt_tokens + 4
    with pytest.raises(NotFound):
        client.capture(pid, "hidden_states", 1)
    client.wait(pid)


def test_a_terminated_process_keeps_the_capture_of_what_it_computed(client, long_model):
    pid = client.spawn("x", model=long_model, max_new_tokens=100_000, **GREEDY, capture=["hidden_states"],
                       capture_layers=[0])
    wait_for(lambda: client.stat(pid).output_tokens >= 5, what="five tokens")
    client.kill(pid, "TERM")
    r = client.wait(pid)
    assert r.finish_reason == "killed" and not [w for w in r.warnings if "captur" in w]
    assert client.capture(pid, "hidden_states", 0).shape == (r.stats.prompt_tokens + len(r.token_ids) - 1, 32)


@pytest.mark.parametrize("extra, error", [
    ({"capture": ["logits"]}, "distinct kinds among attentions, hidden_states"),
    ({"capture": ["attentions"], "capture_layers": [2]}, r"capture_layers \[2\] out of range: the model has 2"),
    ({"capture": ["attentions"], "capture_heads": [4]}, r"capture_heads \[4\] out of range"),
    ({"capture_layers": [0]}, "need capture"),
    ({"capture": ["hidden_states"], "session": True}, "a session cannot capture"),
])
def test_a_bad_capture_is_einval_and_the_kernel_keeps_serving(client, tiny_model, extra, error):
    with pytest.raises(InvalidArgument, match=error):
        client.spawn("bad", model=tiny_model, max_new_tokens=2, **GREEDY, **extra)
    assert client.ping()["time"] > 0


@pytest.fixture(scope="module")
def capped(tiny_model):
    """A kernel whose captures are small: 40K per process, 60K per user."""
    k = KernelProc(extra=["--max-capture-bytes", "40K", "--max-capture-bytes-per-user", "60K"])
    yield k
    k.stop()


@pytest.mark.slow  # starts, loads or kills kernels for 6-25 s: the slow step of .ci/run
def test_the_caps_stop_a_capture_with_a_warning_and_the_generation_goes_on(capped, tiny_model):
    with capped.client() as c:
        plain = c.wait(c.spawn("x" * 10, model=tiny_model, max_new_tokens=60, **GREEDY))
        results, shapes = [], []
        while not results or "nothing captured" not in " ".join(results[-1].warnings):
            assert len(results) < 5, [r.warnings for r in results]
            pid = c.spawn("x" * 10, model=tiny_model, max_new_tokens=60, **GREEDY, capture=["attentions"],
                          capture_layers=[0])
            results.append(c.wait(pid))
            assert results[-1].token_ids == plain.token_ids  # the capture never cuts the output
            try:
                shapes.append(c.capture(pid, "attentions", 0).shape)
            except NotFound:
                shapes.append(None)
    first, second = results[0].warnings, results[1].warnings
    assert len(first) == 1 and "the per-process cap (--max-capture-bytes)" in first[0], first
    assert first[0].startswith(f"capture stopped at {shapes[0][0]} tokens") and shapes[0][0] < 70
    assert len(second) == 1 and "--max-capture-bytes-per-user" in second[0], second
    assert shapes[1][0] < shapes[0][0]
    last = results[-1].warnings
    assert len(last) == 1 and last[0].startswith("nothing captured: ") and "--max-capture-bytes-per-user" in last[0]
    assert shapes[-1] is None
