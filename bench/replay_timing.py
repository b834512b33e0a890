"""Timing a captured CUDA graph: the one loop the bench scripts share."""
from __future__ import annotations

import time

import torch


def graph_replay_ms(graph: "torch.cuda.CUDAGraph", reps: int = 200, warmup: int = 3) -> float:
    """Mean wall milliseconds of one replay of ``graph``: ``warmup`` untimed replays, a sync, then
    ``reps`` replays between two syncs (the graph's inputs are whatever its static tensors hold)."""
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3
