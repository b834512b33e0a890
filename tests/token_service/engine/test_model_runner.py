"""Model-runner bucketing and slot groups (CPU): every decode the engine can run has a graph key."""
from __future__ import annotations

import torch

from token_service.engine.model_runner import ModelRunner, RunnerShape, slot_groups
from token_service.t3.config import T3Config
from token_service.t3.model import T3Model


def _runner(max_slots, max_seq_len, sizes, kv_bucket, first_group=0):
    model = T3Model(T3Config.preset("tiny")).drop_unused().eval()
    return ModelRunner(model, RunnerShape(max_slots, max_seq_len, sizes, kv_bucket, cuda_graphs=True,
                                          first_group=first_group), torch.device("cpu"), torch.float32)


def test_every_decode_shape_has_a_graph_key():
    for max_slots, sizes, first in ((64, (1, 2, 4, 8, 16, 24, 32, 48, 64), 0), (64, (1, 2, 4, 8, 16, 24, 32, 48, 64), 8),
                                    (6, (1, 2, 4, 6), 0), (5, (1, 2, 4, 5), 2)):
        r = _runner(max_slots, 700, sizes, 256, first)
        assert not r.graphs  # CPU: nothing captured, eager path
        for g in r.groups:
            keys = set(r.graph_keys(g))
            assert {kv for _, kv in keys} == {256, 512, 700}
            for n_rows in range(1, g.size + 1):
                for pos in range(0, 700, 7):
                    n, kv = r.decode_key(n_rows, pos, g)
                    assert (n, kv) in keys and n >= n_rows and kv > pos and n <= g.size


def test_slot_groups_cover_max_slots_and_grow_lazily():
    assert slot_groups(128, 8) == (8, 8, 16, 32, 64)
    assert slot_groups(64, 8) == (8, 8, 16, 32)
    assert slot_groups(20, 8) == (8, 8, 4)
    assert slot_groups(4, 8) == (4,)
    r = _runner(20, 512, (1, 2, 4, 8), 256, first_group=8)
    assert [g.cache is not None for g in r.groups] == [True, False, False]
    per_slot = r.groups[0].cache.nbytes() // 8
    assert r.kv_nbytes() == 8 * per_slot
    assert r.group_of(17) is r.groups[2] and r.groups[2].start == 16
    r.ensure_group(2)
    assert r.kv_nbytes() == 12 * per_slot


def test_staged_padded_prefill_equals_in_place_prefill():
    """The CUDA prefill path (several sequences padded to a bucket in staging rows, then copied into
    their slots) run on CPU: same keys/values in each slot and same first tokens as the plain
    in-place prefill; a text longer than the largest bucket takes the in-place path."""
    from token_service.engine.sequence import Sequence
    from token_service.t3.sampling import SamplingParams
    from token_service.t3.voice import VoiceConds, build_voice_prefix

    torch.manual_seed(0)
    model = T3Model(T3Config.preset("tiny")).drop_unused().eval()
    cfg = model.cfg
    conds = VoiceConds(torch.randn(1, cfg.speaker_embed_size), torch.randint(0, 6561, (1, cfg.prompt_len)))
    prefix = build_voice_prefix(model, conds)
    runners = [ModelRunner(model, RunnerShape(8, cfg.prefix_len + 400, (1, 2, 4, 8), 256, cuda_graphs=False,
                                              staged_prefill=staged, prefill_rows=2), torch.device("cpu"),
                           torch.float32) for staged in (False, True)]
    assert not runners[0].prefill_buckets and runners[1].prefill_buckets[-1] == 256
    texts = [[5, 6, 7], list(range(100, 140)), list(range(200, 212)), list(range(300, 600))]  # last: > 255
    toks = []
    for r, slots in zip(runners, ((0, 1, 2, 3), (4, 5, 6, 7))):
        seqs = []
        for i, (text, slot) in enumerate(zip(texts, slots)):
            seq = Sequence(voice="default", text_ids=text, params=SamplingParams(seed=i), seed=i)
            seq.slot = slot
            seqs.append(seq)
        toks.append(r.prefill_many(seqs, [prefix] * len(seqs)))
        assert [s.position for s in seqs] == [cfg.prefix_len + len(t) + 1 for t in texts]
    assert toks[0] == toks[1]
    for i, text in enumerate(texts):
        n = cfg.prefix_len + len(text) + 1
        for (k0, v0), (k1, v1) in zip(runners[0].groups[0].cache.view(slice(i, i + 1), n),
                                      runners[1].groups[0].cache.view(slice(4 + i, 5 + i), n)):
            torch.testing.assert_close(k1, k0, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-5)
