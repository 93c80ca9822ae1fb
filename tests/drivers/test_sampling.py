import pytest
import torch

from llmos.drivers.model.sampling import (SAMPLING_EPS, SamplingParams, apply_repetition_penalty, probabilities,
                                          sample, sample_batch)

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


# -- every accepted value gives a valid distribution ------------------------------------------------------

V = 64
MAX = torch.finfo(torch.float32).max


def extreme_logits():
    g = torch.Generator().manual_seed(0)
    ordinary = torch.randn(V, generator=g) * 3
    huge = torch.where(torch.arange(V) % 2 == 0, MAX, -MAX) * torch.rand(V, generator=g).clamp(min=0.9)
    broken = ordinary.clone()
    broken[3], broken[7], broken[11], broken[12] = float("nan"), float("inf"), float("-inf"), float("inf")
    one_inf = torch.full((V,), float("-inf"))
    one_inf[5] = float("inf")
    return {"ordinary": ordinary, "huge": huge, "nan and inf": broken, "all nan": torch.full((V,), float("nan")),
            "all -inf": torch.full((V,), float("-inf")), "one +inf": one_inf}


GRID = [SamplingParams(temperature=t, top_p=p, top_k=k, repetition_penalty=r)
        for t in (0.0, 1e-45, 1e-38, 1e-20, 1e-6, 1e-5, 0.7, 100.0)
        for p in (1e-6, 0.5, 1.0) for k in (0, 1, 3, V) for r in (0.01, 1.0, 100.0)]


@pytest.mark.parametrize("kind", list(extreme_logits()))
def test_any_accepted_temperature_top_p_top_k_and_penalty_give_a_finite_distribution_and_a_valid_token(kind):
    logits = extreme_logits()[kind]
    batch = logits.expand(len(GRID), V).clone()
    contexts = [[0, 1, 2, 3, 4, 5, 6, 7, 7]] * len(GRID)  # tokens the penalty shrinks (or grows)
    probs = probabilities(batch, GRID, contexts)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(len(GRID)), atol=1e-5)
    gens = [torch.Generator().manual_seed(i) for i in range(len(GRID))]
    tokens = sample_batch(batch, GRID, gens, contexts)
    assert all(0 <= t < V and probs[i, t] > 0 for i, t in enumerate(tokens)), kind
    assert torch.equal(batch.nan_to_num(), logits.expand(len(GRID), V).nan_to_num())  # the caller's logits are left alone


def test_a_tiny_temperature_samples_greedily_instead_of_nan():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1)) * 30
    best = int(logits.argmax())
    for t in (1e-45, 1e-38, 1e-20, 1e-9, SAMPLING_EPS / 2):
        p = SamplingParams(temperature=t, top_p=1.0, seed=3)
        assert p.greedy and {sample(logits, p, p.generator(torch.device("cpu"))) for _ in range(20)} == {best}
    assert not SamplingParams(temperature=SAMPLING_EPS).greedy


def test_a_tiny_temperature_on_the_default_model_gives_the_greedy_token():
    from llmos.drivers.model.engine import load_engine
    from llmos.drivers.model.registry import DEFAULT_MODEL_DIR

    e = load_engine(DEFAULT_MODEL_DIR)
    e.add(1, e.encode("Return the"), {"max_new_tokens": 1, "temperature": 1e-38, "top_p": 1.0, "seed": 0})
    [ev] = e.step()
    assert ev.token_ids == [516] and ev.text == " value"  # the junk draw was "amount" (4095)


def test_greedy_ties_take_the_first_maximal_index_alone_and_in_a_batch():
    tied = torch.tensor([0.5, 2.0, -1.0, 2.0, 2.0, 0.0])
    other = torch.tensor([3.0, 1.0, 3.0, 3.0, 0.0, 0.0])
    g = torch.Generator()
    greedy = SamplingParams(temperature=0.0)
    assert sample(tied, greedy, g) == 1 and sample(other, greedy, g) == 0
    sampled = SamplingParams(temperature=1.0, seed=0)
    batch = torch.stack([tied, other, tied, other])
    params = [greedy, greedy, sampled, SamplingParams(temperature=1e-30)]
    assert sample_batch(batch, params, [sampled.generator(torch.device("cpu")) for _ in params], [[]] * 4)[::3] == [1, 0]
    # a penalised best token hands the tie over to the next first maximal index
    assert sample(tied, SamplingParams(temperature=0.0, repetition_penalty=2.0), g, [1]) == 3


def test_the_repetition_penalty_in_a_batch_gives_each_row_what_it_gets_alone():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(2))
    logits[:, 9] = 8.0  # the best token, and in every context: a strong penalty moves the choice
    ctx = [9, 9, 2, 40]
    params = [SamplingParams(temperature=0.0, repetition_penalty=50.0), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.9, seed=5, repetition_penalty=50.0, top_p=1.0),
              SamplingParams(temperature=0.9, seed=5, top_p=1.0)]
    gens = [p.generator(torch.device("cpu")) for p in params]
    batched = sample_batch(logits, params, gens, [ctx] * 4)
    alone = [sample(logits[i], p, p.generator(torch.device("cpu")), ctx) for i, p in enumerate(params)]
    assert batched == alone
    assert batched[1] == 9 and batched[0] != 9 and 9 not in (batched[2],)  # the penalty did its work
