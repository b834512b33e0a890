"""Streaming S3Gen: speech-token chunks in, audio chunks out, one ``StreamingSession`` per stream.

Stable API (the vocoder engine wraps it)::

    session = StreamingSession(model, voice, seed=0, config=StreamConfig())
    audio = session.push(token_ids)   # 1-D float32 tensor at 24 kHz, possibly empty
    audio = session.finish()          # the rest; afterwards total length == 960 * tokens pushed
    session.close()                   # idempotent; push/finish after close raise SessionClosed

``token_ids``: a list of ints, a 1-D int tensor or numpy array, ids in [0, 6560], non-empty.
Bad input raises ``ValueError`` / ``TypeError`` naming the problem; the session stays usable.
``push`` after ``finish`` raises ``SessionFinished``.

Batched: ``push_batch(sessions, token_lists) -> list[audio]`` equals ``[s.push(t) ...]`` but runs
the ready steps of equally shaped sessions as one ``stream_step`` (``push`` is ``push_batch`` of
one); ``finish_batch(sessions)`` does the same for ``finish`` (final steps of equal remaining
length batch together).

Design (docs/ARCHITECTURE.md, "Vocoder streaming", has the measured numbers):

* Flow: the encoder attends over the whole sequence and its look-ahead conv needs
  ``pre_lookahead`` (3) future tokens, so a chunk of ``n`` tokens is decoded once ``n + 3``
  tokens are there.  Each step re-runs the flow on ``prompt + left context (<= context_tokens
  committed tokens) + chunk + 3 look-ahead tokens``, drops the look-ahead frames (upstream's
  ``finalize=False`` cut) and keeps the chunk's ``2n`` mel frames.  The flow noise is addressed
  by absolute frame (``PositionalNoise``), so every frame sees the noise an offline run of the
  same seed uses.  ``finish()`` decodes the rest without look-ahead, as offline does.
* HiFT: each step vocodes ``hift_context_frames`` already-emitted mel frames (left context) +
  the pending frames; the harmonic source of the context region is the cached excitation of the
  previous step and the sine phase continues from the cached cycle count, so the source is
  continuous.  The last ``holdback_frames`` of audio are held back (their right context is not
  known yet) and cross-faded (raised cosine) with their recomputation in the next step.
* Schedule: the first step commits ``first_chunk_tokens`` (4: audio after 7 tokens), later
  steps double (8, 16) up to ``chunk_tokens`` (25) when ``grow``; step sizes depend only on the
  schedule, not on how the tokens were pushed.
* Lengths: every token yields exactly 960 samples in total; upstream's 40 ms start fade is
  applied to the first samples of the stream.
* Batching: ``stream_step`` is functional: it takes several sessions' states and equally shaped
  chunks (same voice prompt length, same context / chunk / look-ahead sizes: a static shape per
  chunk size once ``context_tokens`` tokens have been committed) and runs the flow and HiFT once
  for the batch.  Rows never mix: each row's state is read and written only at its index.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from .accel import decode_fn, f0_fn, f0_source_fn, flow_fn, flow_noised_fn, flow_padded_fn, flow_padded_noised_fn
from .hift import SourceNoise
from .model import S3GenModel, VoiceCond, check_tokens, trim_fade
from .noise import MEL_STREAM, SOURCE_STREAM, PositionalNoise, hashed_normal


class SessionClosed(RuntimeError):
    """The session was closed."""


class SessionFinished(RuntimeError):
    """finish() was already called: the stream has ended."""


@dataclass(frozen=True)
class StreamConfig:
    first_chunk_tokens: int = 4    # tokens decoded by the first step (audio starts after these + 3)
    chunk_tokens: int = 25         # tokens per later step (the cap when ``grow``)
    context_tokens: int = 50       # committed tokens re-encoded as left context of the flow
    hift_context_frames: int = 8   # emitted mel frames HiFT sees on the left
    holdback_frames: int = 2       # audio frames held back and cross-faded with the next step
    grow: bool = True              # later chunks double from first_chunk_tokens up to chunk_tokens
    extra_lookahead_tokens: int = 0  # right context beyond the encoder's own look-ahead (latency for quality)
    pad_windows: bool = True       # every flow window padded (masked) to one shape: all ready sessions, one flow batch
    noise_on_host: bool = False    # hash the noise on the host and copy it (fewer device kernels, ~2-8 ms host time a row)

    def __post_init__(self):
        if self.first_chunk_tokens < 1 or self.chunk_tokens < 1:
            raise ValueError("chunk sizes must be >= 1 token")
        if self.context_tokens < 0 or self.hift_context_frames < 0 or self.extra_lookahead_tokens < 0:
            raise ValueError("context sizes must be >= 0")
        if not 0 <= self.holdback_frames <= 2 * min(self.first_chunk_tokens, self.chunk_tokens):
            raise ValueError("holdback_frames must be in [0, 2 * smallest chunk]")


@dataclass
class StreamState:
    """Everything one stream carries between steps (all tensors are this stream's own)."""

    voice: VoiceCond
    noise: PositionalNoise
    spk: torch.Tensor                       # (1, n_mels) projected x-vector
    phase: torch.Tensor                     # (H+1, 1) source start phases
    tokens: list[int] = field(default_factory=list)   # received tokens, from ``token_base`` on
    token_base: int = 0                     # absolute index of tokens[0]
    committed: int = 0                      # tokens whose mel frames are final
    mel_hist: torch.Tensor | None = None    # (n_mels, <= ctx) emitted frames before ``emitted``
    mel_pending: torch.Tensor | None = None  # (n_mels, k) final frames from ``emitted`` on
    emitted: int = 0                        # mel frames whose audio has been returned
    src_hist: torch.Tensor | None = None    # (1, len(mel_hist) * hop) excitation before ``emitted``
    cycles: torch.Tensor | None = None      # (H+1,) source cycles at the first sample of ``emitted``
    tail: torch.Tensor | None = None        # (X,) previous step's audio from ``emitted`` on (held back)
    prompt_noise: torch.Tensor | None = None  # (n_mels, Fp) flow noise of the prompt frames (a constant)
    prompt_tokens_cpu: torch.Tensor | None = None  # (Tp,) the voice's prompt tokens, host copy


def new_state(model: S3GenModel, voice: VoiceCond, seed: int) -> StreamState:
    """A new stream's state (the open of a session). Per-voice constants (the voice's tensors on
    the model's device, their host prompt tokens, the speaker projection) come from caches filled
    by the voice's first session; per-seed ones (noise keys, the prompt frames' noise, the source
    start phases) are made on the device from host ints (fills, no host -> device copy): on CUDA
    the open queues kernels and never waits for the GPU."""
    cfg = model.cfg
    if voice.n_prompt_frames != cfg.token_mel_ratio * voice.n_prompt_tokens:
        raise ValueError(f"voice prompt has {voice.n_prompt_frames} mel frames for {voice.n_prompt_tokens} tokens; "
                         f"streaming needs exactly {cfg.token_mel_ratio} per token")
    n_mels, dev = cfg.n_mels, model.device
    voice = _voice_on(voice, dev)
    noise = PositionalNoise(seed, cfg.n_mels, cfg.hift_harmonics + 1)
    spk = _speaker(model, voice.embedding)
    # constants of the session made at open, not in its first step (which the first audio waits for)
    for stream in (MEL_STREAM, SOURCE_STREAM):
        noise.key(stream)
    return StreamState(voice=voice, noise=noise, spk=spk, phase=noise.source_phase(dev),
                       mel_hist=torch.zeros(n_mels, 0, device=dev), mel_pending=torch.zeros(n_mels, 0, device=dev),
                       src_hist=torch.zeros(1, 0, device=dev), cycles=torch.zeros(cfg.hift_harmonics + 1, device=dev),
                       prompt_noise=noise.mel(0, voice.n_prompt_frames, device=dev),
                       prompt_tokens_cpu=_prompt_tokens_host(voice))


_PROMPT_HOST = WeakTensorKeyDictionary()  # a voice's prompt tokens (on the device) -> their host copy
_ON_DEVICE = WeakTensorKeyDictionary()  # a voice's host tensor -> {device: (host version, its copy there)}
_SPEAKER = WeakTensorKeyDictionary()  # a voice's x-vector (on the device) -> (speaker weights' signature, spk)


def _prompt_tokens_host(voice: VoiceCond) -> torch.Tensor:
    """(Tp,) host int64 prompt tokens of ``voice``: one device -> host read per voice, not per session."""
    t = voice.prompt_token
    host = _PROMPT_HOST.get(t)
    if host is None:
        host = _PROMPT_HOST[t] = t[0].cpu()
    return host


def _version(t: torch.Tensor) -> int | None:
    """``t``'s in-place version counter (None for an inference tensor, which has none)."""
    return None if t.is_inference() else t._version


def _on(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """``t`` on ``dev``: itself when it is there, else its copy made by the first call (one copy per
    tensor and device, not per session; made again if ``t`` was changed in place since)."""
    if t.device == dev:
        return t
    copies = _ON_DEVICE.get(t)
    if copies is None:
        copies = _ON_DEVICE[t] = {}
    hit = copies.get(dev)
    if hit is not None and hit[0] == _version(t):
        return hit[1]
    copy = t.to(dev)
    copies[dev] = (_version(t), copy)
    return copy


def _voice_on(voice: VoiceCond, dev: torch.device) -> VoiceCond:
    """``voice.to(dev)`` through the per-tensor device cache; a host prompt is also recorded as the
    device prompt's host copy (``_prompt_tokens_host`` then reads nothing back)."""
    dev = torch.device(dev)
    out = VoiceCond(_on(voice.prompt_token, dev), _on(voice.prompt_feat, dev), _on(voice.embedding, dev))
    if out.prompt_token is not voice.prompt_token and voice.prompt_token.device.type == "cpu":
        if out.prompt_token not in _PROMPT_HOST:
            _PROMPT_HOST[out.prompt_token] = voice.prompt_token[0].clone()  # not a view: no cycle to the key
    return out


def _speaker_signature(model: S3GenModel) -> tuple:
    """What the speaker projection depends on besides the x-vector: the flow object and its speaker
    weights (the same tensors, storage, dtype, device and in-place version). Our ``TokenToMel`` keeps
    them in ``spk_embed_affine_layer``; the exported graphs' flow (``GraphFlow``) in ``spk_weight`` /
    ``spk_bias``."""
    flow = model.flow
    layer = getattr(flow, "spk_embed_affine_layer", None)
    weights = list(layer.parameters()) if layer is not None else \
        [t for t in (getattr(flow, "spk_weight", None), getattr(flow, "spk_bias", None)) if t is not None]
    return (weakref.ref(flow),) + tuple((weakref.ref(p), p.data_ptr(), p.dtype, p.device, _version(p))
                                        for p in weights)


def _same_signature(a: tuple, b: tuple) -> bool:
    return (len(a) == len(b) and a[0]() is b[0]()
            and all(x[0]() is y[0]() and x[1:] == y[1:] for x, y in zip(a[1:], b[1:])))


def _speaker(model: S3GenModel, embedding: torch.Tensor) -> torch.Tensor:
    """(1, n_mels) ``model.flow.speaker(embedding)``, computed once per voice (x-vector tensor) and
    speaker weights, not per session. Read-only: sessions share it."""
    sig = _speaker_signature(model)
    hit = _SPEAKER.get(embedding)
    if hit is not None and _same_signature(hit[0], sig):
        return hit[1]
    with torch.inference_mode():
        spk = model.flow.speaker(embedding)
    _SPEAKER[embedding] = (sig, spk)
    return spk


def _to_device(parts: Sequence[torch.Tensor], dev) -> list[torch.Tensor]:
    """Small host int64 tensors (a step's tokens, lengths, noise keys / positions) -> tensors of the
    same shapes on ``dev``, through ONE host buffer and ONE copy. On CUDA the buffer is pinned and
    the copy ``non_blocking``: no host sync, the copy is queued before the kernels that read it
    (the caching host allocator keeps the buffer until the copy is done). On the host: views."""
    dev = torch.device(dev)
    cuda = dev.type == "cuda"
    buf = torch.empty(sum(p.numel() for p in parts), dtype=torch.int64, pin_memory=cuda)
    torch.cat([p.reshape(-1).to(torch.int64) for p in parts], out=buf)
    flat = buf if dev.type == "cpu" else buf.to(dev, non_blocking=cuda)
    out, i = [], 0
    for p in parts:
        out.append(flat[i:i + p.numel()].view(p.shape))
        i += p.numel()
    return out


@lru_cache(maxsize=64)
def _fade_in_table(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _fade_in(n, device, dtype)


@lru_cache(maxsize=16)
def _start_fade(sample_rate: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Upstream's start fade gains (``trim_fade``) over its whole length ``2 * sample_rate // 50``, on ``device``."""
    return trim_fade(2 * (sample_rate // 50), sample_rate, device, dtype)


def _stack_equal(tensors: Sequence[torch.Tensor], what: str) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"stream_step batch needs equal {what} shapes, got {sorted(shapes)}")
    return torch.stack(list(tensors))


def _window(s: StreamState, chunk: torch.Tensor, ahead: torch.Tensor, config: StreamConfig, ratio: int, dev
            ) -> tuple[torch.Tensor, int, int]:
    """Row ``s``'s flow window (host int64: prompt + left context + chunk + look-ahead), the absolute
    mel frame where its context starts, and its context length in tokens."""
    nctx = min(config.context_tokens, s.committed)
    start = s.committed - nctx
    ctx = torch.tensor(s.tokens[start - s.token_base:s.committed - s.token_base], dtype=torch.long)
    if s.prompt_tokens_cpu is None:  # once per session, not a device -> host copy per step
        s.prompt_tokens_cpu = s.voice.prompt_token[0].cpu()
    if s.prompt_noise is None:  # the prompt frames' noise is a constant of the session
        s.prompt_noise = s.noise.mel(0, s.voice.n_prompt_frames, device=dev)
    return torch.cat([s.prompt_tokens_cpu, ctx, chunk.cpu(), ahead.cpu()]), s.voice.n_prompt_frames + ratio * start, nctx


def _noise_index(states: Sequence[StreamState], stream: int, starts: Sequence[int]) -> torch.Tensor:
    """(B, 2) host int64: every row's key of noise ``stream`` (a session constant) and start position
    (batch first, as the graph caches pad and slice dim 0)."""
    return torch.tensor([[s.noise.key(stream), int(a)] for s, a in zip(states, starts)], dtype=torch.int64)


def _batch_noise(index: torch.Tensor, index_dev: torch.Tensor | None, length: int, rows: int, config: StreamConfig,
                 dev) -> torch.Tensor:
    """Every row's positional noise from position ``index[b, 1]`` on, key ``index[b, 0]``: (B, rows, length)
    on ``dev``, hashed there from ``index_dev`` (the index already on the device), or on the host
    from ``index`` with ``config.noise_on_host`` (then copied)."""
    if config.noise_on_host or index_dev is None:
        return hashed_normal(index[:, 0], index[:, 1], length, rows).to(dev)
    return hashed_normal(index_dev[:, 0], index_dev[:, 1], length, rows)


def _flow_noise(states: Sequence[StreamState], index: torch.Tensor, index_dev: torch.Tensor | None, n_frames: int,
                n_mels: int, config: StreamConfig, dev) -> torch.Tensor:
    """(B, n_mels, Fp + n_frames): each row's prompt noise, then its noise from frame ``index[b, 1]`` on."""
    fresh = _batch_noise(index, index_dev, n_frames, n_mels, config, dev)
    return torch.cat([_stack_equal([s.prompt_noise for s in states], "prompt noise"), fresh], dim=2)


def _prompt_noise(states: Sequence[StreamState]) -> torch.Tensor:
    """(B, n_mels, Fp) the rows' prompt noise (a view for one row: no copy kernel)."""
    if len(states) == 1:
        return states[0].prompt_noise.unsqueeze(0)
    return _stack_equal([s.prompt_noise for s in states], "prompt noise")


def _stack_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``; a single row as a view (no copy kernel)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(list(tensors))


def _rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` of (1, ...) rows; a single row as it is (no copy kernel)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors))


def lookahead_tokens(model, config: StreamConfig) -> int:
    """Tokens after a chunk that its (non-final) step needs: the encoder's look-ahead + the extra."""
    return model.cfg.pre_lookahead + config.extra_lookahead_tokens


def first_window(model, config: StreamConfig) -> int:
    """Tokens after the prompt in a first chunk's flow window (no context yet)."""
    return config.first_chunk_tokens + lookahead_tokens(model, config)


def padded_window(model, config: StreamConfig) -> int:
    """Tokens after the prompt in the one padded flow window: context + largest chunk + look-ahead."""
    return config.context_tokens + max(config.first_chunk_tokens, config.chunk_tokens) + lookahead_tokens(model, config)


@torch.inference_mode()
def flow_rows(model: S3GenModel, states: Sequence[StreamState], chunks: Sequence[torch.Tensor],
              aheads: Sequence[torch.Tensor], config: StreamConfig) -> list[torch.Tensor]:
    """The flow part of a step for rows of any chunk / look-ahead / context sizes: row b's new mel
    frames ``(n_mels, ratio * len(chunks[b]))`` (on the model's device; empty for an empty chunk).

    With ``config.pad_windows`` and a model whose flow has ``forward_padded``, rows of one prompt
    length run as one batch in one window shape (right-padded, masked: the same numbers as alone),
    except first chunks: their windows all have the width ``Tp + first_window`` (nothing to pad),
    so they run as one batch through the unmasked flow (fewer kernels, flash attention in the
    decoder), the same graph family per batch bucket as a narrow padded window would be.
    Otherwise rows run in groups of equal window shape. The flow noise is hashed inside the flow
    (its CUDA graph) unless ``config.noise_on_host`` or the flow cannot (exported graphs). Each
    group's tokens, lengths and noise keys / positions reach the device in one copy
    (``_to_device``). States are not changed.
    """
    cfg, dev = model.cfg, model.device
    ratio = cfg.token_mel_ratio
    out: list[torch.Tensor | None] = [None] * len(states)
    rows = []
    for b, (s, c, a) in enumerate(zip(states, chunks, aheads)):
        if c.numel() == 0:
            out[b] = torch.zeros(cfg.n_mels, 0, device=dev)
        else:
            rows.append((b, *_window(s, c, a, config, ratio, dev)))
    padded = config.pad_windows and hasattr(model.flow, "forward_padded")
    # the noise hashed inside the flow (its graph): a model whose flow can (not the exported graphs)
    inside = not config.noise_on_host and hasattr(model.flow, "forward_noised")
    la_first = lookahead_tokens(model, config)
    groups: dict[tuple, list] = {}
    for row in rows:
        b, win = row[0], row[1]
        tp = states[b].voice.n_prompt_tokens
        if padded:  # first chunks: one exact width, unmasked; every other window: one padded width
            first = win.numel() == tp + first_window(model, config) and aheads[b].numel() == la_first
            key = ("first", tp) if first else ("padded", tp)
        else:
            key = ("exact", win.numel(), aheads[b].numel())
        groups.setdefault(key, []).append(row)
    for key, group in groups.items():
        idx = [r[0] for r in group]
        sts = [states[b] for b in idx]
        tp = sts[0].voice.n_prompt_tokens
        index = _noise_index(sts, MEL_STREAM, [r[2] for r in group])
        feat = _rows([s.voice.prompt_feat for s in sts])
        spk = _rows([s.spk for s in sts])
        if key[0] == "padded":
            width = tp + padded_window(model, config)
            if max(r[1].numel() for r in group) > width:
                raise ValueError(f"a flow window exceeds the padded width {width} (config {config})")
            tok = torch.zeros(len(group), width, dtype=torch.long)
            for k, r in enumerate(group):
                tok[k, :r[1].numel()] = r[1]
            tok_len = torch.tensor([r[1].numel() for r in group])
            mel_len = ratio * (tok_len - torch.tensor([aheads[b].numel() for b in idx]))
            tok_d, tok_len_d, mel_len_d, index_d = _to_device([tok, tok_len, mel_len, index], dev)
            if inside:
                mel = flow_padded_noised_fn(model)(tok_d, feat, spk, _prompt_noise(sts), index_d, tok_len_d, mel_len_d)
            else:
                noise = _flow_noise(sts, index, index_d, ratio * (width - tp), cfg.n_mels, config, dev)
                mel = flow_padded_fn(model)(tok_d, feat, spk, noise, tok_len_d, mel_len_d)
            for k, r in enumerate(group):  # row k's chunk frames follow its context
                n = chunks[r[0]].numel()
                out[r[0]] = mel[k, :, ratio * r[3]:ratio * (r[3] + n)]
        else:
            la = aheads[idx[0]].numel()
            tok = torch.stack([r[1] for r in group])
            tok_d, index_d = _to_device([tok, index], dev)
            if inside:
                mel = flow_noised_fn(model)(tok_d, feat, spk, _prompt_noise(sts), index_d, drop_tail_frames=ratio * la)
            else:
                noise = _flow_noise(sts, index, index_d, ratio * (tok.size(1) - tp), cfg.n_mels, config, dev)
                mel = flow_fn(model)(tok_d, feat, spk, noise, drop_tail_frames=ratio * la)
            for k, r in enumerate(group):
                out[r[0]] = mel[k, :, mel.size(2) - ratio * chunks[r[0]].numel():]
    return out  # type: ignore[return-value]


@torch.inference_mode()
def stream_step(model: S3GenModel, states: Sequence[StreamState], chunks: torch.Tensor, lookahead: torch.Tensor,
                final: bool, config: StreamConfig) -> torch.Tensor:
    """Advance a batch of streams by one chunk each; returns their new audio ``(B, L)`` (equal lengths).

    chunks: (B, n) tokens to commit (n may be 0 only when ``final``); lookahead: (B, la) the
    tokens after them (la = pre_lookahead, or 0 when ``final``). Row b continues ``states[b]``,
    which is updated in place. HiFT needs equal shapes in every row (context / pending lengths).
    """
    mels = flow_rows(model, states, list(chunks), list(lookahead), config)
    return hift_rows(model, states, torch.stack(mels), chunks.size(1), final, config)


@torch.inference_mode()
def hift_rows(model: S3GenModel, states: Sequence[StreamState], mel: torch.Tensor, n: int, final: bool,
              config: StreamConfig) -> torch.Tensor:
    """The HiFT part of a step: rows' new mel frames ``(B, n_mels, ratio*n)`` -> their new audio
    ``(B, L)``; commits the ``n`` tokens in every state. Rows need equal HiFT context / pending /
    tail lengths (one graph shape). Noise is drawn on the device for the whole batch: with the
    F0 predictor and the harmonic source in one call (``mel2wav.f0_source``, one CUDA graph), or
    eagerly after the F0 graph with ``config.noise_on_host`` / a HiFT without ``f0_source``."""
    cfg = model.cfg
    dev = model.device
    hop = cfg.hop_samples

    # ---- HiFT: left context + pending frames
    if len({(s.mel_hist.size(1), s.mel_pending.size(1)) for s in states}) != 1:
        raise ValueError("stream_step batch needs equal HiFT context / pending lengths in every row")
    index = _noise_index(states, SOURCE_STREAM, [s.emitted * hop for s in states])
    index_d = None if config.noise_on_host else _to_device([index], dev)[0]  # queued before the graphs, no sync
    mel_in = torch.cat([_stack_rows([s.mel_hist for s in states]), _stack_rows([s.mel_pending for s in states]), mel],
                       dim=2)
    h = states[0].mel_hist.size(1)
    total = mel_in.size(2)
    hold = 0 if final else config.holdback_frames
    emit_frames = total - h - hold  # frames from ``emitted`` on that are returned now
    phase = _stack_rows([s.phase for s in states])
    cycles0 = _stack_rows([s.cycles for s in states])
    if index_d is not None and hasattr(model.mel2wav, "f0_source"):  # F0, noise and source: one graph
        src_new, cycles = f0_source_fn(model)(mel_in, phase, index_d, cycles0, skip_frames=h,
                                              end_sample=max(0, emit_frames * hop))
    else:
        f0 = f0_fn(model)(mel_in)[:, h * hop:]  # new part only: (B, (total-h)*hop)
        src_noise = _batch_noise(index, index_d, f0.size(1), cfg.hift_harmonics + 1, config, dev)
        src_new, _ = model.mel2wav.m_source(f0, SourceNoise(phase, src_noise), cycles0)
        cycles = _cycles(model, f0, cycles0)[:, :, emit_frames * hop - 1] if emit_frames > 0 else None
    source = torch.cat([_stack_rows([s.src_hist for s in states]), src_new], dim=2)
    audio = decode_fn(model)(mel_in, source)  # (B, total*hop), starts at frame emitted-h

    out = audio[:, h * hop:(h + emit_frames) * hop].float()
    tails = {s.tail.numel() if s.tail is not None else 0 for s in states}
    if out.size(1) and tails != {0}:  # cross-fade the held-back audio of the previous step
        if len(tails) == 1:
            x = min(tails.pop(), out.size(1))
            w = _fade_in_table(x, out.device, out.dtype)
            tail = torch.stack([s.tail[:x] for s in states])
            out = torch.cat([tail * (1 - w) + out[:, :x] * w, out[:, x:]], dim=1)
        else:  # rows with different tails (not produced by push_batch's grouping, but allowed)
            out = out.clone()
            for b, s in enumerate(states):
                if s.tail is not None and s.tail.numel():
                    x = min(s.tail.numel(), out.size(1))
                    w = _fade_in_table(x, out.device, out.dtype)
                    out[b, :x] = s.tail[:x] * (1 - w) + out[b, :x] * w
    fade_len = 2 * (cfg.sample_rate // 50)
    early = [b for b, s in enumerate(states) if s.emitted * hop < fade_len]
    if early and out.size(1):  # upstream's start fade, on the first samples of a stream (gains past it are 1)
        fade = _start_fade(cfg.sample_rate, out.device, out.dtype)
        # in place: ``out`` is this step's own audio (or a view of it); only the tail after it is read later
        for b in early:
            a0 = states[b].emitted * hop
            k = min(fade_len - a0, out.size(1))
            out[b, :k] *= fade[a0:a0 + k]
    # carry state: one compact copy per part for the whole batch, rows keep views of it (a row never
    # keeps a whole step's tensors alive, only what it carries)
    keep_from = max(0, h + emit_frames - config.hift_context_frames)
    mel_hist = mel_in[:, :, keep_from:h + emit_frames].clone()
    mel_pending = mel_in[:, :, h + emit_frames:].clone()
    src_hist = source[:, :, keep_from * hop:(h + emit_frames) * hop].clone()
    cycles = cycles.clone() if emit_frames > 0 else None  # compact (eager: a view of (B, H+1, L))
    tail = None if final else audio[:, (h + emit_frames) * hop:].clone()
    for b, s in enumerate(states):
        s.mel_hist, s.mel_pending, s.src_hist = mel_hist[b], mel_pending[b], src_hist[b]
        if cycles is not None:
            s.cycles = cycles[b]
        s.tail = None if tail is None else tail[b]
        s.emitted += emit_frames
        s.committed += n
        drop = max(0, s.committed - config.context_tokens - s.token_base)
        if drop:
            del s.tokens[:drop]
            s.token_base += drop
    return out


def _cycles(model: S3GenModel, f0: torch.Tensor, cycles0: torch.Tensor) -> torch.Tensor:
    """Source cycle counts (mod 1) per harmonic and sample: (B, H+1, L)."""
    src = model.mel2wav.m_source
    mult = torch.arange(1, src.harmonics + 1, device=f0.device, dtype=f0.dtype).view(1, -1, 1)
    return (torch.cumsum(f0.unsqueeze(1) * mult / src.sample_rate, dim=-1) + cycles0.unsqueeze(-1)) % 1


def _fade_in(n: int, device, dtype) -> torch.Tensor:
    """Raised-cosine ramp 0 -> 1 over n samples (excluding the end points)."""
    t = (torch.arange(n, device=device, dtype=torch.float64) + 0.5) / n
    return (0.5 - 0.5 * torch.cos(torch.pi * t)).to(dtype)


class StreamingSession:
    """One stream: ``push(tokens)`` -> audio, ``finish()`` -> rest, ``close()``. Not thread-safe."""

    def __init__(self, model: S3GenModel, voice: VoiceCond, seed: int = 0, config: StreamConfig | None = None):
        self.model = model
        self.config = config or StreamConfig()
        self.state = new_state(model, voice, seed)
        self.finished = False
        self.closed = False
        self.n_tokens = 0
        self._last_chunk = 0

    def _check_open(self) -> None:
        if self.closed:
            raise SessionClosed("the vocoder session is closed")
        if self.finished:
            raise SessionFinished("the vocoder session has already finished; no more tokens are accepted")

    @property
    def _pending_tokens(self) -> int:
        return self.state.token_base + len(self.state.tokens) - self.state.committed

    def _next_chunk(self) -> int:
        """Tokens of the next step: first_chunk_tokens, then (if ``grow``) doubling up to chunk_tokens."""
        c = self.config
        if self.state.committed == 0:
            return c.first_chunk_tokens
        if not c.grow:
            return c.chunk_tokens
        return min(c.chunk_tokens, max(self._last_chunk * 2, 1))

    def tokens_needed(self) -> int:
        """More tokens ``push`` needs before its next step can run (and return audio); >= 1."""
        if self.closed or self.finished:
            return 1
        return max(1, self._next_chunk() + self._lookahead - self._pending_tokens)

    @property
    def _lookahead(self) -> int:
        return lookahead_tokens(self.model, self.config)

    def _slice(self, n: int, la: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``n`` uncommitted tokens (1, n) and the ``la`` after them (1, la)."""
        s = self.state
        i = s.committed - s.token_base
        chunk = torch.tensor(s.tokens[i:i + n], dtype=torch.long).view(1, n)
        ahead = torch.tensor(s.tokens[i + n:i + n + la], dtype=torch.long).view(1, la)
        return chunk, ahead

    def push(self, tokens: Any) -> torch.Tensor:
        """Add speech tokens; returns the audio that became final (float32, 1-D, maybe empty)."""
        return push_batch([self], [tokens])[0]

    def finish(self) -> torch.Tensor:
        """End of the stream: decode every remaining token and return the rest of the audio."""
        return finish_batch([self])[0]

    def _hift_key(self, n: int) -> tuple:
        """Sessions whose next step of ``n`` tokens has an equal key share one HiFT batch (one shape)."""
        st = self.state
        return n, st.mel_hist.size(1), st.mel_pending.size(1), 0 if st.tail is None else st.tail.numel()

    def close(self) -> None:
        """Free the state (idempotent)."""
        self.closed = True
        self.state = None  # type: ignore[assignment]


def push_batch(sessions: Sequence[StreamingSession], token_lists: Sequence[Any]) -> list[torch.Tensor]:
    """``[s.push(t) for s, t in zip(sessions, token_lists)]``, with the ready steps of equal shape
    (same model, config, chunk size, look-ahead, prompt length, context lengths) run as one batched
    ``stream_step``. Every input is validated before any session changes; one bad list raises and
    no session takes tokens. Returns each session's new audio (1-D float32 CPU, maybe empty).
    """
    if len(sessions) != len(token_lists):
        raise ValueError(f"push_batch got {len(sessions)} sessions and {len(token_lists)} token lists")
    if len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("push_batch got the same session twice")
    checked = []
    for k, (sess, toks) in enumerate(zip(sessions, token_lists)):
        sess._check_open()
        try:
            checked.append(check_tokens(toks, sess.model.cfg.vocab_size))
        except (TypeError, ValueError) as e:
            raise type(e)(f"{e}" if len(sessions) == 1 else f"session {k}: {e}") from None
    for sess, tok in zip(sessions, checked):
        sess.state.tokens.extend(tok.tolist())
        sess.n_tokens += tok.numel()
    outs: list[list[torch.Tensor]] = [[torch.zeros(0)] for _ in sessions]
    while True:
        ready = []
        for i, sess in enumerate(sessions):
            n, la = sess._next_chunk(), sess._lookahead
            if sess._pending_tokens >= n + la:
                ready.append((i, n, la))
        if not ready:
            break
        for i, a in _step_rows([sessions[i] for i, _, _ in ready], [n for _, n, _ in ready],
                               [la for _, _, la in ready], final=False):
            outs[ready[i][0]].append(a)
    return [torch.cat(o) for o in outs]


def _step_rows(sessions: Sequence[StreamingSession], ns: Sequence[int], las: Sequence[int], final: bool
               ) -> list[tuple[int, torch.Tensor]]:
    """One step of each session (``ns[k]`` tokens, ``las[k]`` look-ahead): the flow for all rows of
    one model and config together (``flow_rows``), then HiFT per group of equal shape. Returns
    (index into ``sessions``, audio on the host) pairs."""
    results = []
    by_model: dict[tuple, list[int]] = {}
    for k, sess in enumerate(sessions):
        by_model.setdefault((id(sess.model), sess.config), []).append(k)
    for (_, config), ks in by_model.items():
        model = sessions[ks[0]].model
        parts = [sessions[k]._slice(ns[k], las[k]) for k in ks]
        mels = flow_rows(model, [sessions[k].state for k in ks], [c[0] for c, _ in parts], [a[0] for _, a in parts],
                         config)
        groups: dict[tuple, list[int]] = {}
        for j, k in enumerate(ks):
            groups.setdefault(sessions[k]._hift_key(ns[k]), []).append(j)
        for js in groups.values():
            n = ns[ks[js[0]]]
            audio = hift_rows(model, [sessions[ks[j]].state for j in js], torch.stack([mels[j] for j in js]), n,
                              final, config).cpu()  # one device -> host copy per group
            for j, a in zip(js, audio):
                sessions[ks[j]]._last_chunk = n
                results.append((ks[j], a))
    return results


def finish_batch(sessions: Sequence[StreamingSession]) -> list[torch.Tensor]:
    """``[s.finish() for s in sessions]``, batched: the final flows together (``flow_rows``), then
    HiFT per group of equal shape (same remaining tokens, context and HiFT lengths). Every session
    is checked first (closed / already finished raise, and no session changes). Returns each
    session's last audio (1-D float32 CPU, maybe empty).
    """
    if len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("finish_batch got the same session twice")
    for sess in sessions:
        sess._check_open()
    outs: list[torch.Tensor] = [torch.zeros(0) for _ in sessions]
    for sess in sessions:
        sess.finished = True
    live = [i for i, sess in enumerate(sessions) if sess.n_tokens]
    rows = [sessions[i] for i in live]
    for k, a in _step_rows(rows, [s._pending_tokens for s in rows], [0] * len(rows), final=True):
        outs[live[k]] = a
    return outs
