import torch

from llmos.drivers.model.sampling import SamplingParams, apply_repetition_penalty, sample

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5])


def test_temperature_zero_is_argmax():
    assert sample(LOGITS, SamplingParams(temperature=0.0), torch.Generator()) == 1


def test_top_k_one_and_tiny_top_p_always_pick_the_best_token():
    for params in (SamplingParams(temperature=2.0, top_k=1, top_p=1.0), SamplingParams(temperature=2.0, top_p=1e-6)):
        g = params.generator(torch.device("cpu"))
        assert {sample(LOGITS, params, g) for _ in range(50)} == {1}


def test_top_k_two_never_picks_outside_the_two_best():
    p = SamplingParams(temperature=5.0, top_k=2, top_p=1.0, seed=0)
    g = p.generator(torch.device("cpu"))
    assert {sample(LOGITS, p, g) for _ in range(200)} == {1, 2}


def test_a_seed_makes_sampling_repeatable():
    p = SamplingParams(temperature=1.0, top_p=1.0, seed=42)
    a = [sample(LOGITS, p, g) for g in [p.generator(torch.device("cpu"))] for _ in range(30)]
    b = [sample(LOGITS, p, g) for g in [p.generator(torch.device("cpu"))] for _ in range(30)]
    assert a == b and len(set(a)) > 1


def test_repetition_penalty_shrinks_seen_tokens_like_transformers():
    out = apply_repetition_penalty(torch.tensor([2.0, -2.0, 1.0]), torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_unknown_keys_are_ignored_when_building_params():
    p = SamplingParams.from_dict({"temperature": 0.0, "priority": 3, "seed": None})
    assert p.temperature == 0.0 and p.seed is None
