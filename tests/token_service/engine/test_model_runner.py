"""Model-runner bucketing (CPU): every decode the engine can run has a captured-graph key."""
from __future__ import annotations

import torch

from token_service.engine.model_runner import ModelRunner, RunnerShape
from token_service.t3.config import T3Config
from token_service.t3.model import T3Model


def _runner(max_slots, max_seq_len, sizes, kv_bucket):
    model = T3Model(T3Config.preset("tiny")).drop_unused().eval()
    return ModelRunner(model, RunnerShape(max_slots, max_seq_len, sizes, kv_bucket, cuda_graphs=True),
                       torch.device("cpu"), torch.float32)


def test_every_decode_shape_has_a_graph_key():
    for max_slots, sizes in ((64, (1, 2, 4, 8, 16, 24, 32, 48, 64)), (6, (1, 2, 4, 6)), (5, (1, 2, 4, 5))):
        r = _runner(max_slots, 700, sizes, 256)
        keys = set(r.graph_keys())
        assert not r.graphs  # CPU: nothing captured, eager path
        assert {kv for _, kv in keys} == {256, 512, 700}
        for n_rows in range(1, max_slots + 1):
            for pos in range(0, 700):
                n, kv = r.decode_key(n_rows, pos)
                assert (n, kv) in keys and n >= n_rows and kv > pos and n <= max_slots
