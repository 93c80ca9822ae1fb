"""Token log-probabilities (drivers/model/score.py): the sliding window's plan, and the numbers against
Hugging Face's perplexity guide computed directly with transformers on the same tiny model."""

import math

import pytest

from llmos.drivers.model.score import MAX_SCORE_TOKENS, ScoreJob, windows
from llmos.syscalls.errors import InvalidArgument, TooBig
from tests.tinymodel import make_tiny_llama


@pytest.mark.parametrize("n,context", [(0, 8), (1, 8), (2, 8), (8, 8), (9, 8), (100, 8), (101, 9), (5, 64)])
def test_every_token_but_the_first_is_scored_once_with_half_a_context_before_it(n, context):
    plan = windows(n, context)
    scored = [t for begin, end, first in plan for t in range(first, end)]
    assert scored == list(range(1, n))
    for i, (begin, end, first) in enumerate(plan):
        assert end - begin <= context and begin < first
        assert begin == i * (context // 2)
        if i:  # after the first window every scored token has at least context - stride tokens before it
            assert first - begin >= context - context // 2


def test_a_context_of_one_token_cannot_score():
    with pytest.raises(InvalidArgument):
        windows(10, 1)


def test_more_tokens_than_one_score_takes_is_e2big():
    with pytest.raises(TooBig):
        ScoreJob(1, [0] * (MAX_SCORE_TOKENS + 1), 64)


def _hf_guide_nll(model, ids, max_length):
    """Hugging Face's perplexity guide (fixed-length models, stride = max_length // 2): labels of the context
    part are -100 and the model's loss is the mean over the window's targets. The guide weighs each window's
    mean by its valid labels minus one for the shift; that is exact for the first window only (later
    windows' first label is already -100), so the targets are counted after the shift here."""
    import torch

    stride = max_length // 2
    input_ids = torch.tensor([ids])
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        x = input_ids[:, begin_loc:end_loc]
        target_ids = x.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(x, labels=target_ids).loss
        num_valid = (target_ids[:, 1:] != -100).sum().item()  # the labels are shifted inside the model
        nll_sum += loss.item() * num_valid
        n_tokens += num_valid
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


@pytest.mark.parametrize("n", [40, 200])  # one window; a text five times the context
def test_the_perplexity_equals_the_hugging_face_guides(tmp_path, n):
    import torch
    from transformers import AutoModelForCausalLM

    path = make_tiny_llama(tmp_path / "m", context=64, seed=3)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = [(i * 37 + 11) % 260 for i in range(n)]
    job = ScoreJob(7, ids, 64)
    while not job.done:
        job.step(model, torch.device("cpu"))
    reply = job.reply()
    want_nll, want_n = _hf_guide_nll(model, ids, 64)
    assert len(reply.logprobs) == want_n == n - 1
    assert reply.windows == len(windows(n, 64)) and reply.stride == 32 and reply.rid == 7
    assert math.isclose(reply.nll, -sum(reply.logprobs), rel_tol=1e-6)
    assert math.isclose(math.exp(reply.nll / want_n), math.exp(want_nll / want_n), rel_tol=1e-4)
