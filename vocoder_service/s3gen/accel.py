"""Inference fast path for S3Gen: half-precision flow, folded weight norm, CUDA graphs per shape.

    model = prepare_s3gen(model, dtype="bfloat16", cuda_graphs=True)   # in place; returns model

* ``dtype``: the flow (token embedding, conformer encoder, meanflow estimator) runs in it; the
  ODE state, the returned mel and all of HiFT (F0 predictor, harmonic source, STFT / iSTFT, the
  convolutions) stay float32. ``"auto"`` and ``"float32"`` change nothing numerically.
* HiFT's weight norm is folded (``HiFTGenerator.fold_weight_norm``): same numbers, one fewer op
  per convolution. The state dict then has plain ``weight`` keys: prepare only after loading.
  Never prepare a ``copy.deepcopy`` of a model you still use: the copy shares the parametrized
  conv classes, and folding removes their ``weight`` property (the original breaks).
* ``cuda_graphs`` (CUDA only): the flow and HiFT's F0 predictor / generator become
  ``CudaGraphCache``s: the first call with a new input shape is captured (after a warm-up run),
  later calls with that shape copy their inputs into the static buffers and replay. Batches are
  padded (row 0 repeated) up to ``BATCH_BUCKETS`` so a few graphs serve every batch size;
  ``warm_up_streaming`` captures the schedule's shapes before serving. A streaming
  session has few shapes (first chunk: always the same; later chunks: one per chunk size until
  ``context_tokens`` tokens are committed, then static), times the batch sizes ``push_batch``
  sees. ``stream_step`` uses them through ``flow_noised_fn`` / ``flow_padded_noised_fn`` /
  ``f0_source_fn`` / ``decode_fn`` (the flow and source noise are hashed inside the graphs;
  ``flow_fn`` / ``flow_padded_fn`` / ``f0_fn`` serve ``noise_on_host``); the offline API
  (variable lengths) stays eager.

What is not cached, and why: the encoder and the estimator attend over the whole window (prompt +
context + chunk, no chunk mask), so the prompt's hidden states change with every chunk; only the
speaker projection (``StreamState.spk``), the prompt's noise and the position tables are
constants of a session.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from tts_common.cuda_capture import capture_error_mode, exclusive_capture

log = logging.getLogger(__name__)

DTYPES = {
    "auto": torch.float32, "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"auto" | "float32" | "bfloat16" | "float16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported S3Gen dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown S3Gen dtype {dtype!r}; use one of auto, float32, bfloat16, float16") from None


class CudaGraphCache:
    """Calls ``fn(*tensors, **consts)`` through one captured CUDA graph per input signature.

    The signature is the tensors' (shape, dtype, device) plus the constant keyword arguments.
    Outputs (a tensor or a tuple of tensors) are cloned after each replay, so callers own them.
    Graphs share one memory pool and warm-up stream (``GraphMemory``; with the other caches of the
    model too). Batches larger than the largest bucket run in slices of it. A shape
    whose capture fails runs eagerly from then on (logged once); past ``max_graphs`` signatures
    new ones also run eagerly. Thread-unsafe by design: one worker thread drives the model.
    """

    def __init__(self, fn: Callable[..., Any], name: str, max_graphs: int = 64, warmup: int = 2,
                 batch_buckets: tuple[int, ...] = (), shared: "GraphMemory | None" = None):
        self.fn, self.name, self.max_graphs, self.warmup = fn, name, max_graphs, warmup
        self.batch_buckets = tuple(sorted(batch_buckets))
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], Any]] = {}
        self.eager: set[tuple] = set()
        self.errors: list[str] = []  # the first capture failures, for logs / the bench
        self.shared = shared or GraphMemory()
        self.captures = self.replays = 0

    def _key(self, args: tuple[torch.Tensor, ...], consts: dict) -> tuple:
        return (tuple((tuple(a.shape), a.dtype, a.device) for a in args), tuple(sorted(consts.items())))

    def __call__(self, *args: torch.Tensor, **consts: Any):
        if not all(a.is_cuda for a in args):
            return self.fn(*args, **consts)
        if self.batch_buckets:
            # pad dim 0 (rows are independent) to the next bucket: a few graphs serve every batch size
            B = args[0].size(0)
            top = self.batch_buckets[-1]
            if B > top:  # larger than the largest graph: run it in slices of that size
                parts = [self(*(a[i:i + top] for a in args), **consts) for i in range(0, B, top)]
                if isinstance(parts[0], torch.Tensor):
                    return torch.cat(parts)
                return tuple(torch.cat(p) for p in zip(*parts))
            Bp = next(b for b in self.batch_buckets if b >= B)
            if Bp > B:
                args = tuple(torch.cat([a, a[:1].expand(Bp - B, *a.shape[1:])]) for a in args)
                out = self._call(args, consts)
                return out[:B] if isinstance(out, torch.Tensor) else tuple(o[:B] for o in out)
        return self._call(args, consts)

    def _call(self, args: tuple[torch.Tensor, ...], consts: dict):
        key = self._key(args, consts)
        entry = self.graphs.get(key)
        if entry is None:
            if key in self.eager or len(self.graphs) >= self.max_graphs:
                return self.fn(*args, **consts)
            entry = self._capture(key, args, consts)
            if entry is None:
                return self.fn(*args, **consts)
        graph, static_in, static_out = entry
        for buf, a in zip(static_in, args):
            buf.copy_(a)
        graph.replay()
        self.replays += 1
        if isinstance(static_out, torch.Tensor):
            return static_out.clone()
        return tuple(o.clone() for o in static_out)

    @exclusive_capture  # co-located mode: one capture at a time per process (tts_common/cuda_capture.py)
    def _capture(self, key: tuple, args: tuple[torch.Tensor, ...], consts: dict):
        static_in = [a.clone() for a in args]
        try:
            side = self.shared.side_stream(args[0].device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: kernels chosen, caches (position tables) filled
                for _ in range(self.warmup):
                    self.fn(*static_in, **consts)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.shared.pool(), capture_error_mode=capture_error_mode()):
                static_out = self.fn(*static_in, **consts)
        except Exception as exc:  # noqa: BLE001 - any capture failure: run this shape eagerly
            log.warning("CUDA graph capture of %s for %s failed (%s: %s); running it eagerly",
                        self.name, key[0], type(exc).__name__, exc)
            self.eager.add(key)
            if len(self.errors) < 4:
                self.errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001 - already reported above
                pass
            return None
        self.captures += 1
        entry = (graph, static_in, static_out)
        self.graphs[key] = entry
        return entry

    def stats(self) -> dict[str, Any]:
        return {"graphs": len(self.graphs), "eager_shapes": len(self.eager), "captures": self.captures,
                "replays": self.replays, "capture_errors": list(self.errors)}


class GraphMemory:
    """What every graph cache of one model shares: one memory pool and one warm-up stream.

    One pool: the graphs replay one at a time on one stream, so a capture may reuse the memory
    the previous captures freed (the pool grows to the largest working set, plus the static
    outputs). One warm-up stream: blocks the caching allocator keeps for a stream are reused only
    on that stream, so a new side stream per capture would strand every warm-up's memory.
    """

    def __init__(self):
        self._pool = None
        self._stream: torch.cuda.Stream | None = None

    def pool(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def side_stream(self, device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # streaming batches are padded up to one of these (larger: sliced)


class S3GenGraphs:
    """The graphed callables ``stream_step`` uses (attribute ``model.graphs``)."""

    def __init__(self, model, max_graphs: int = 64, batch_buckets: tuple[int, ...] = BATCH_BUCKETS):
        kw = dict(max_graphs=max_graphs, batch_buckets=batch_buckets, shared=GraphMemory())
        self.flow = CudaGraphCache(model.flow, "flow", **kw)
        self.flow_padded = CudaGraphCache(model.flow.forward_padded, "flow.padded", **kw)
        # the same two flows with their noise hashed inside the graph (the default; the two above
        # serve ``noise_on_host``): graphs are captured on first use only, so unused caches cost nothing
        self.flow_noised = CudaGraphCache(model.flow.forward_noised, "flow.noised", **kw)
        self.flow_padded_noised = CudaGraphCache(model.flow.forward_padded_noised, "flow.padded.noised", **kw)
        self.f0 = CudaGraphCache(model.mel2wav.f0_at_samples, "hift.f0", **kw)
        self.f0_source = CudaGraphCache(model.mel2wav.f0_source, "hift.f0_source", **kw)  # with noise inside
        self.decode = CudaGraphCache(model.mel2wav.decode, "hift.decode", **kw)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Each cache's ``stats()`` by attribute name (``flow``, ``flow_padded``, ..., ``decode``)."""
        return {name: cache.stats() for name, cache in vars(self).items() if isinstance(cache, CudaGraphCache)}


def _graphed_or_eager(model, name: str, eager: Callable) -> Callable:
    """``model.graphs.<name>`` when the model was prepared with CUDA graphs, else ``eager``."""
    g = getattr(model, "graphs", None)
    return getattr(g, name) if g is not None else eager


def flow_fn(model) -> Callable:
    """``model.flow`` or its graphed form (same signature; ``drop_tail_frames`` by keyword)."""
    return _graphed_or_eager(model, "flow", model.flow)


def flow_padded_fn(model) -> Callable:
    """``model.flow.forward_padded`` or its graphed form."""
    return _graphed_or_eager(model, "flow_padded", model.flow.forward_padded)


def flow_noised_fn(model) -> Callable:
    """``model.flow.forward_noised`` or its graphed form."""
    return _graphed_or_eager(model, "flow_noised", model.flow.forward_noised)


def flow_padded_noised_fn(model) -> Callable:
    """``model.flow.forward_padded_noised`` or its graphed form."""
    return _graphed_or_eager(model, "flow_padded_noised", model.flow.forward_padded_noised)


def f0_fn(model) -> Callable:
    """``model.mel2wav.f0_at_samples`` or its graphed form."""
    return _graphed_or_eager(model, "f0", model.mel2wav.f0_at_samples)


def f0_source_fn(model) -> Callable:
    """``model.mel2wav.f0_source`` or its graphed form."""
    return _graphed_or_eager(model, "f0_source", model.mel2wav.f0_source)


def decode_fn(model) -> Callable:
    """``model.mel2wav.decode`` or its graphed form."""
    return _graphed_or_eager(model, "decode", model.mel2wav.decode)


def warm_up_streaming(model, voice, config=None, batch_sizes: tuple[int, ...] = (1,), n_tokens: int = 120) -> None:
    """Run ``n_tokens`` through ``push_batch`` at each batch size, so every chunk shape of the
    schedule (first chunk, growing chunks, static chunks once ``context_tokens`` are committed)
    is captured before serving (with CUDA graphs; without, it only warms kernels)."""
    from .streaming import StreamingSession, finish_batch, push_batch

    g = torch.Generator().manual_seed(0)
    for b in batch_sizes:
        sessions = [StreamingSession(model, voice, seed=i, config=config) for i in range(b)]
        toks = torch.randint(0, model.cfg.vocab_size, (b, n_tokens), generator=g).tolist()
        for i in range(0, n_tokens, 5):
            push_batch(sessions, [t[i:i + 5] for t in toks])
        finish_batch(sessions)  # one final-step shape (others are captured when first seen)
        for s in sessions:
            s.close()


def prepare_s3gen(model, dtype: str | torch.dtype = "auto", cuda_graphs: bool = False, max_graphs: int = 64,
                  graph_batch: int = 32):
    """Make a loaded ``S3GenModel`` ready for serving, in place (see the module docstring).

    ``graph_batch``: the largest batch bucket captured as one graph (one of ``BATCH_BUCKETS``);
    larger batches replay it in slices. Its working set sizes the graph memory pool (the encoder's
    relative-position scores grow with batch × window²), while rows per second barely change
    beyond 16–32 rows.
    Raises ``ValueError`` for an unknown dtype or graph batch, or ``cuda_graphs`` on a model not on a CUDA device.
    """
    if graph_batch not in BATCH_BUCKETS:
        raise ValueError(f"graph_batch must be one of {BATCH_BUCKETS}, got {graph_batch}")
    dt = parse_dtype(dtype)
    if cuda_graphs and model.device.type != "cuda":
        raise ValueError(f"cuda_graphs needs the model on a CUDA device, it is on {model.device}")
    model.eval()
    model.mel2wav.fold_weight_norm()
    model.flow.to(dt)
    # torch.istft reads its window envelope on the host: not capturable; the graphed path uses
    # the device-only overlap-add inverse (equal to rounding; tests/vocoder_service/test_accel.py)
    model.mel2wav.graph_safe_istft = bool(cuda_graphs)
    buckets = tuple(b for b in BATCH_BUCKETS if b <= graph_batch)
    model.graphs = S3GenGraphs(model, max_graphs, buckets) if cuda_graphs else None
    return model
