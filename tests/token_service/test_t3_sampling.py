"""Sampling: upstream's processors (HF transformers 5.2.0) vs ours, and the hashed sampler."""
from __future__ import annotations

import pytest
import torch

from token_service.t3.config import START_SPEECH
from token_service.t3.sampling import (SamplingParams, process_logits, row_values, sample, seed32,
                                       vocab_hash)

V = 6563


def _upstream_processors(temperature, top_k, top_p, penalty):
    """Exactly the list upstream's ``T3.inference_turbo`` builds."""
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    procs = LogitsProcessorList()
    if temperature > 0 and temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    if penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty))
    return procs


def _columns(params) -> tuple[torch.Tensor, ...]:
    """Per-row sampling settings as the engine keeps them: temperature, top_k, top_p threshold, top_p on, penalty."""
    rows = [row_values(p, V) for p in params]
    f = lambda key, dt: torch.tensor([r[key] for r in rows], dtype=dt)  # noqa: E731
    return (f("temperature", torch.float32), f("top_k", torch.long), f("top_p_threshold", torch.float32),
            f("top_p_on", torch.bool), f("penalty", torch.float32))


def _ours(logits, seen, params):
    return process_logits(logits, seen, *_columns(params))


@pytest.mark.upstream
def test_distribution_matches_upstream_on_20_random_logit_vectors():
    g = torch.Generator().manual_seed(0)
    settings = [SamplingParams(), SamplingParams(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0),
                SamplingParams(temperature=0.5, top_k=50, top_p=0.8, repetition_penalty=1.5),
                SamplingParams(temperature=1.3, top_k=1, top_p=0.95, repetition_penalty=2.0),
                SamplingParams(temperature=0.0, top_k=7000, top_p=0.3, repetition_penalty=0.9)]
    logits, seen, params, ref_probs = [], [], [], []
    for i in range(20):
        lg = torch.randn(1, V, generator=g) * (1 + 3 * torch.rand(1, generator=g))
        if i == 0:
            input_ids = torch.tensor([[START_SPEECH]])  # the first step's input_ids
        else:
            input_ids = torch.randint(0, V, (1, int(torch.randint(1, 300, (1,), generator=g))), generator=g)
            input_ids[0, 0] = int(lg.argmax())  # make sure the penalty hits the top token sometimes
        p = settings[i % len(settings)]
        ref = _upstream_processors(p.temperature, p.top_k, p.top_p, p.repetition_penalty)(input_ids, lg.clone())
        ref_probs.append(torch.softmax(ref, -1))
        m = torch.zeros(1, V, dtype=torch.bool)
        m[0, input_ids[0]] = True
        logits.append(lg), seen.append(m), params.append(p)
    ours = torch.softmax(_ours(torch.cat(logits), torch.cat(seen), params), -1)  # all 20 rows in one batch
    ref = torch.cat(ref_probs)
    assert float((ours - ref).abs().max()) <= 1e-5
    assert torch.equal(ours > 0, ref > 0)  # same support


def _draw(probs, seed, steps):
    vh = vocab_hash(probs.shape[-1], "cpu")
    n = len(steps)
    return sample(probs.expand(n, -1), torch.full((n,), seed32(seed)), torch.tensor(steps), vh)


def test_sampler_frequencies_follow_probabilities():
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.0, 0.125]])
    draws = _draw(probs, 7, list(range(40000)))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[3] == 0
    assert float((freq - probs[0]).abs().max()) < 0.01  # ~4 sigma at n=40000


def test_sampler_is_a_pure_function_of_seed_and_step():
    probs = torch.softmax(torch.randn(1, V), -1)
    a = _draw(probs, 123, [0, 1, 2, 3])
    assert torch.equal(a, _draw(probs, 123, [0, 1, 2, 3]))
    assert torch.equal(a[2:], _draw(probs, 123, [2, 3]))
    assert not torch.equal(_draw(probs, 123, list(range(16))), _draw(probs, 124, list(range(16))))


def test_greedy_is_argmax():
    lg = torch.randn(4, V)
    seen = torch.zeros(4, V, dtype=torch.bool)
    s = _ours(lg, seen, [SamplingParams(top_k=1)] * 4)
    assert torch.equal(_draw_rows(torch.softmax(s, -1)), lg.argmax(-1))


def _draw_rows(probs):
    return sample(probs, torch.arange(probs.shape[0]), torch.zeros(probs.shape[0], dtype=torch.long),
                  vocab_hash(probs.shape[1], "cpu"))


@pytest.mark.parametrize("kwargs, word", [(dict(temperature=-1), "temperature"), (dict(top_k=-2), "top_k"),
                                          (dict(top_p=1.5), "top_p"), (dict(repetition_penalty=0), "repetition_penalty"),
                                          (dict(max_new_tokens=0), "max_new_tokens")])
def test_bad_sampling_params_name_the_field(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SamplingParams(**kwargs)


def _fast(logits, seen, params, width=1024):
    from token_service.t3.sampling import process_logits_topk
    return process_logits_topk(logits, seen, *_columns(params), width)


def test_topk_fast_path_equals_full_sort_path():
    g = torch.Generator().manual_seed(1)
    settings = [SamplingParams(), SamplingParams(temperature=0.5, top_k=50, top_p=0.8, repetition_penalty=1.5),
                SamplingParams(temperature=1.3, top_k=1, top_p=0.95, repetition_penalty=2.0),
                SamplingParams(temperature=1.0, top_k=1000, top_p=1.0, repetition_penalty=1.0),
                SamplingParams(temperature=0.7, top_k=1024, top_p=0.5, repetition_penalty=0.9)]
    n = 25
    logits = torch.randn(n, V, generator=g) * (1 + 3 * torch.rand(n, 1, generator=g))
    seen = torch.rand(n, V, generator=g) < 0.05
    params = [settings[i % len(settings)] for i in range(n)]
    full, fast = _ours(logits, seen, params), _fast(logits, seen, params)
    assert torch.equal(torch.isinf(full), torch.isinf(fast))  # same support
    assert float((torch.softmax(full, -1) - torch.softmax(fast, -1)).abs().max()) <= 1e-6


def test_topk_fast_path_keeps_ties_with_the_kth_value():
    lg = torch.randn(2, V)
    lg[:, :40] = 5.0  # 40 tied maxima, top_k=10 keeps all of them (HF: s < kth dropped)
    seen = torch.zeros(2, V, dtype=torch.bool)
    ps = [SamplingParams(top_k=10, top_p=1.0, temperature=1.0, repetition_penalty=1.0)] * 2
    full, fast = _ours(lg, seen, ps), _fast(lg, seen, ps, width=64)
    assert int(torch.isfinite(fast[0]).sum()) == 40
    assert torch.equal(full, fast)


def test_hashed_uniform_is_strictly_inside_the_unit_interval():
    """The extreme hashes must map inside (0, 1): E = -log(U) > 0 and finite, so a zero-probability
    token can never win ``argmax(p / E)`` (U == 1.0 gave 0/0 = NaN, which argmax picks)."""
    import torch

    from token_service.t3.sampling import bits_to_unit, sample, vocab_hash

    u = bits_to_unit(torch.tensor([0, 1, 0xFFFFFEFF, 0xFFFFFFFF], dtype=torch.int64))
    assert bool((u > 0).all()) and bool((u < 1).all()), u
    e = -torch.log(u)
    assert bool((e > 0).all()) and bool(torch.isfinite(e).all())
    # one-hot rows always return their one token, whatever the seed and step
    V = 6563
    probs = torch.zeros(64, V)
    ids = torch.randint(0, V, (64,), generator=torch.Generator().manual_seed(0))
    probs[torch.arange(64), ids] = 1.0
    vh = vocab_hash(V, "cpu")
    for step in range(50):
        got = sample(probs, torch.arange(64, dtype=torch.int64) * 7919, torch.full((64,), step), vh)
        assert torch.equal(got, ids)
