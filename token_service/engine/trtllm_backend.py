"""Token engine on TensorRT-LLM's executor API (``tensorrt_llm.bindings.executor``).

Same contract as ``LLMEngine`` (docs/ARCHITECTURE.md): ``voices()``, ``tokenize(text)``,
``generate(voice, text_ids, SamplingParams) -> async iterator of list[int]`` (speech ids < 6561,
in order, ends at stop-of-speech; ``aclose()`` cancels), ``stats()``, ``close()``.

Per request (what ``export.trtllm_checkpoint`` prepared):

* ``input_token_ids`` = ``[V, V+1, …, V+P-1]`` (prompt-table ids, ``V`` = vocab size) + text ids
  + start-of-speech (unified id ``V_text + 6561``);
* ``prompt_tuning_config = PromptTuningConfig(embedding_table=<voice's table (P, C)>,
  input_token_extra_ids=[voice index + 1] * P + [0] * rest)`` — the extra ids make the prefix KV
  blocks of different voices hash differently, so KV-cache block reuse shares a voice's prefix
  between requests without mixing voices;
* ``embedding_bias`` = ``embedding_bias.npy`` (speech-head bias on speech ids, -1e9 on text ids);
* ``end_id = pad_id = V_text + 6562``; ``streaming=True``; ``OutputConfig(exclude_input_from_output=True)``;
* ``SamplingConfig(beam_width=1, top_k, top_p, temperature, repetition_penalty, seed)``.
  Differences from upstream's sampler, inherent to TensorRT-LLM's sampling layers: the penalty is
  applied before temperature/top-k/top-p (upstream: after), and it sees the whole sequence
  (prompt and start token included) rather than only the generated tokens. The distribution is
  therefore close to, not identical with, the PyTorch engine's; logits themselves are identical
  (``export.validate``).

A poller thread calls ``await_responses`` and hands each response to its stream's event loop.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import logging
import threading
from pathlib import Path
from typing import AsyncIterator, Sequence

import numpy as np
import torch

from token_service.t3.config import SPEECH_VOCAB_VALID
from token_service.t3.sampling import SamplingParams
from token_service.t3.text import TextError, TextTokenizer

log = logging.getLogger(__name__)

META = "t3_trtllm.json"
MAX_TOP_K = 1024  # TensorRT-LLM's top-k sampling kernels support k <= 1024


def _import_executor():
    try:
        from tensorrt_llm.bindings import executor as tle  # type: ignore
    except ImportError as e:
        from tts_common.config import ConfigError
        raise ConfigError(f"engine=trtllm needs TensorRT-LLM (NVIDIA's tensorrt_llm package, GPU images): {e}") from None
    return tle


class TRTLLMEngine:
    """T3 on a TensorRT-LLM engine folder built from ``tts-export trtllm`` output."""

    def __init__(self, engine_dir: str | Path, model_dir: str | Path, *, max_streams: int = 64, tle=None,
                 executor=None, device: str = "cuda", poll_ms: int = 10, kv_cache_fraction: float = 0.85):
        self.tle = tle or _import_executor()
        d = Path(engine_dir)
        if not (d / META).is_file():
            raise FileNotFoundError(f"{d / META} not found: is {d} a T3 TensorRT-LLM engine folder "
                                    f"(build_engine.sh copies it there)?")
        self.meta = json.loads((d / META).read_text())
        m = self.meta
        self.dev = torch.device(device)
        self.bias = torch.from_numpy(np.load(d / m["embedding_bias"])).float().to(self.dev)
        if self.bias.shape != (m["vocab_size"],):
            raise ValueError(f"embedding bias has shape {tuple(self.bias.shape)}, expected ({m['vocab_size']},)")
        self.tables: dict[str, torch.Tensor] = {}
        for i, (name, rel) in enumerate(sorted(m["voices"].items())):
            with np.load(d / rel) as z:
                t = torch.from_numpy(np.array(z["prompt_table"]))
            t = t[0] if t.dim() == 3 else t
            if tuple(t.shape) != (m["prefix_len"], t.shape[-1]):
                raise ValueError(f"voice {name!r}: prompt table {tuple(t.shape)} does not have {m['prefix_len']} rows")
            dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(m["dtype"], torch.float32)
            self.tables[name] = t.to(self.dev, dtype)
        self.voice_index = {n: i for i, n in enumerate(sorted(self.tables))}
        limits = m.get("limits", {})
        self.max_text_tokens = int(limits.get("max_text_tokens", 400))
        self.max_new_tokens = int(limits.get("max_new_tokens", 1000))
        self.tokenizer = TextTokenizer(model_dir, self.max_text_tokens)
        self.max_streams = max_streams
        if executor is None:
            tle = self.tle
            cfg = tle.ExecutorConfig(max_beam_width=1,
                                     kv_cache_config=tle.KvCacheConfig(free_gpu_memory_fraction=kv_cache_fraction,
                                                                       enable_block_reuse=True))
            executor = tle.Executor(d, tle.ModelType.DECODER_ONLY, cfg)
        self.executor = executor
        self._lock = threading.Lock()
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._counters = dict(requests=0, finished=0, cancelled=0, failed=0, tokens=0)
        self._stop = False
        self._poll = datetime.timedelta(milliseconds=poll_ms)
        self._thread = threading.Thread(target=self._poll_loop, name="trtllm-responses", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ contract
    def voices(self) -> list[str]:
        return sorted(self.tables)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.tokenize(text)

    def stats(self) -> dict[str, int]:
        with self._lock:
            active = len(self._streams)
            return dict(active=active, free_slots=max(0, self.max_streams - active), max_slots=self.max_streams,
                        **self._counters)

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=5)
        self.executor.shutdown()

    def request_for(self, voice: str, text_ids: Sequence[int], params: SamplingParams):
        """Validate and build the executor ``Request`` (raises ``ValueError``/``TextError`` naming the problem)."""
        m, tle = self.meta, self.tle
        if voice not in self.tables:
            raise ValueError(f"unknown voice {voice!r}; available: {', '.join(self.voices())}")
        ids = [int(t) for t in text_ids]
        if not ids:
            raise TextError("text_ids is empty")
        bad = [t for t in ids if not 0 <= t < m["text_vocab_size"]]
        if bad:
            raise ValueError(f"text ids out of range [0, {m['text_vocab_size']}): {bad[:5]}")
        if len(ids) > self.max_text_tokens:
            raise TextError(f"text is too long: {len(ids)} tokens, the engine was built for {self.max_text_tokens}")
        if params.max_new_tokens > self.max_new_tokens:
            raise ValueError(f"max_new_tokens={params.max_new_tokens} exceeds the engine's {self.max_new_tokens}")
        lo, hi = m["prompt_ids"]
        input_ids = list(range(lo, hi)) + ids + [m["start_speech_id"]]
        extra = [self.voice_index[voice] + 1] * (hi - lo) + [0] * (len(ids) + 1)
        if params.top_k > MAX_TOP_K:
            raise ValueError(f"top_k={params.top_k} exceeds TensorRT-LLM's sampling limit of {MAX_TOP_K}")
        temperature = params.temperature if params.temperature > 0 else 1.0  # upstream: 0 = no scaling
        top_k, top_p = int(params.top_k), float(params.top_p)
        if top_p == 0.0:  # HF keeps only the most likely token; TensorRT-LLM needs top_p in (0, 1]
            top_k, top_p = 1, 1.0
        sampling = tle.SamplingConfig(beam_width=1, top_k=top_k, top_p=top_p,
                                      temperature=float(temperature),
                                      repetition_penalty=float(params.repetition_penalty),
                                      seed=int(params.resolved_seed()))
        return tle.Request(input_token_ids=input_ids, max_tokens=int(params.max_new_tokens), streaming=True,
                           sampling_config=sampling,
                           output_config=tle.OutputConfig(exclude_input_from_output=True),
                           end_id=m["end_id"], pad_id=m["pad_id"], embedding_bias=self.bias,
                           prompt_tuning_config=tle.PromptTuningConfig(embedding_table=self.tables[voice],
                                                                       input_token_extra_ids=extra))

    def generate(self, voice: str, text_ids: Sequence[int], params: SamplingParams | None = None
                 ) -> AsyncIterator[list[int]]:
        params = params or SamplingParams(max_new_tokens=min(1001, self.max_new_tokens))
        request = self.request_for(voice, text_ids, params)
        return self._stream(request)

    # ------------------------------------------------------------------ streams
    async def _stream(self, request) -> AsyncIterator[list[int]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if len(self._streams) >= self.max_streams:
                raise RuntimeError(f"token engine is full ({self.max_streams} streams)")
            req_id = self.executor.enqueue_request(request)
            self._streams[req_id] = (loop, queue)
            self._counters["requests"] += 1
        done = False
        try:
            while not done:
                kind, payload = await queue.get()
                if kind == "error":
                    done = True
                    raise RuntimeError(f"TensorRT-LLM request failed: {payload}")
                ids, done = self._speech_ids(payload[0]), payload[1]
                if ids:
                    yield ids
        finally:
            with self._lock:
                alive = self._streams.pop(req_id, None) is not None
                if not done:
                    self._counters["cancelled"] += 1
            if not done and alive:
                self.executor.cancel_request(req_id)

    def _speech_ids(self, unified: Sequence[int]) -> list[int]:
        m = self.meta
        out = []
        for t in unified:
            if t == m["end_id"]:
                break
            s = int(t) - m["speech_offset"]
            if 0 <= s < SPEECH_VOCAB_VALID:
                out.append(s)
        return out

    def _poll_loop(self) -> None:
        while not self._stop:
            try:
                responses = self.executor.await_responses(timeout=self._poll)
            except Exception as e:  # noqa: BLE001 - the executor died: fail every stream
                log.exception("TensorRT-LLM executor failed")
                self._fail_all(str(e))
                return
            for r in responses:
                with self._lock:
                    target = self._streams.get(r.request_id)
                    if target is None:
                        continue
                    if r.has_error():
                        item = ("error", r.error_msg)
                        self._counters["failed"] += 1
                    else:
                        toks = list(r.result.output_token_ids[0])
                        final = bool(r.result.is_final)
                        item = ("tokens", (toks, final))
                        self._counters["tokens"] += len(toks)
                        if final:
                            self._counters["finished"] += 1
                loop, queue = target
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                except RuntimeError:  # that stream's loop is closed
                    pass

    def _fail_all(self, msg: str) -> None:
        with self._lock:
            targets = list(self._streams.values())
        for loop, queue in targets:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ("error", msg))
            except RuntimeError:
                pass


def load_trtllm_engine(cfg) -> TRTLLMEngine:
    """``TokenServiceConfig`` with ``engine=trtllm`` → :class:`TRTLLMEngine` (needs CUDA + tensorrt_llm)."""
    if not getattr(cfg, "engine_dir", None):
        from tts_common.config import ConfigError
        raise ConfigError("engine=trtllm needs --engine-dir / TTS_ENGINE_DIR (the built TensorRT-LLM engine folder)")
    engine = TRTLLMEngine(cfg.engine_dir, cfg.model_dir, max_streams=getattr(cfg, "max_streams", 64))
    log.info("token engine ready", extra={"engine": "trtllm", "voices": engine.voices()})
    return engine


__all__ = ["TRTLLMEngine", "load_trtllm_engine"]
