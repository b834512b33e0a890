"""A fake of ``tensorrt_llm.bindings.executor`` (the names and keyword arguments our backend uses).

Mirrors the real signatures: ``Executor(model_path, ModelType.DECODER_ONLY, ExecutorConfig)``,
``enqueue_request(Request) -> int``, ``await_responses(timeout=timedelta) -> list[Response]``,
``cancel_request(id)``, ``shutdown()``; ``Request(input_token_ids=, max_tokens=, streaming=,
sampling_config=, output_config=, end_id=, pad_id=, embedding_bias=, prompt_tuning_config=)``;
``SamplingConfig(beam_width=, top_k=, top_p=, temperature=, repetition_penalty=, seed=)``;
``OutputConfig(exclude_input_from_output=)``; ``PromptTuningConfig(embedding_table=,
input_token_extra_ids=)``; ``Response.request_id / has_error() / error_msg / result.output_token_ids
/ result.is_final``.

Generation follows TensorRT-LLM's documented semantics on the exported checkpoint: ids
``>= vocab_size`` read rows of the request's prompt table, ``embedding_bias`` is added to the
logits, ``end_id`` stops the request (not returned), ``max_tokens`` caps it. It evaluates the
checkpoint with ``export.validate.TRTLLMGPTReader`` and picks the argmax when ``top_k == 1``
(else samples with the request's seed). One token per streamed response.
"""
from __future__ import annotations

import datetime
import queue
import threading
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from export.validate import TRTLLMGPTReader


class ModelType(Enum):
    DECODER_ONLY = 0


@dataclass
class KvCacheConfig:
    free_gpu_memory_fraction: float | None = None
    enable_block_reuse: bool = False


@dataclass
class ExecutorConfig:
    max_beam_width: int = 1
    kv_cache_config: KvCacheConfig = field(default_factory=KvCacheConfig)


@dataclass
class SamplingConfig:
    beam_width: int = 1
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None


@dataclass
class OutputConfig:
    return_log_probs: bool = False
    exclude_input_from_output: bool = False


@dataclass
class PromptTuningConfig:
    embedding_table: torch.Tensor
    input_token_extra_ids: list[int] | None = None


@dataclass
class Request:
    input_token_ids: list[int]
    max_tokens: int
    streaming: bool = False
    sampling_config: SamplingConfig = field(default_factory=SamplingConfig)
    output_config: OutputConfig = field(default_factory=OutputConfig)
    end_id: int | None = None
    pad_id: int | None = None
    embedding_bias: torch.Tensor | None = None
    prompt_tuning_config: PromptTuningConfig | None = None


@dataclass
class Result:
    output_token_ids: list[list[int]]
    is_final: bool


@dataclass
class Response:
    request_id: int
    result: Result | None = None
    error_msg: str = ""

    def has_error(self) -> bool:
        return bool(self.error_msg)


class Executor:
    def __init__(self, model_path, model_type=ModelType.DECODER_ONLY, config: ExecutorConfig | None = None):
        self.reader = TRTLLMGPTReader(Path(model_path))
        self.V = self.reader.config["vocab_size"]
        self.out: queue.Queue = queue.Queue()
        self.next_id = 1
        self.cancelled: set[int] = set()
        self.requests: dict[int, Request] = {}
        self.fail_next = None
        self.delay = 0.0
        self._lock = threading.Lock()

    def enqueue_request(self, request: Request) -> int:
        with self._lock:
            rid = self.next_id
            self.next_id += 1
        self.requests[rid] = request
        threading.Thread(target=self._run, args=(rid, request), daemon=True).start()
        return rid

    def _run(self, rid: int, req: Request) -> None:
        import time
        if self.fail_next:
            self.out.put(Response(rid, error_msg=self.fail_next))
            return
        ids = list(req.input_token_ids)
        table = req.prompt_tuning_config.embedding_table if req.prompt_tuning_config else None
        n_prompt = sum(1 for t in ids if t >= self.V)
        assert table is not None and table.shape[0] >= n_prompt, "prompt ids need a prompt table"
        extra = req.prompt_tuning_config.input_token_extra_ids
        assert extra is None or len(extra) == len(ids), "input_token_extra_ids must match input length"
        sc = req.sampling_config
        g = torch.Generator().manual_seed(sc.seed or 0)
        for step in range(req.max_tokens):
            if rid in self.cancelled:
                return
            logits = self.reader.logits(ids, table.float().cpu(), req.embedding_bias.float().cpu())[-1]
            if sc.top_k == 1:
                tok = int(logits.argmax())
            else:
                tok = int(torch.multinomial(torch.softmax(logits / (sc.temperature or 1.0), -1), 1, generator=g))
            final = tok == req.end_id or step == req.max_tokens - 1
            out = [] if tok == req.end_id else [tok]
            ids.append(tok)
            self.out.put(Response(rid, Result([out], final)))
            if self.delay:
                time.sleep(self.delay)
            if final:
                return

    def await_responses(self, timeout: datetime.timedelta | None = None) -> list[Response]:
        try:
            first = self.out.get(timeout=timeout.total_seconds() if timeout else None)
        except queue.Empty:
            return []
        items = [first]
        while not self.out.empty():
            items.append(self.out.get_nowait())
        return items

    def cancel_request(self, request_id: int) -> None:
        self.cancelled.add(request_id)

    def shutdown(self) -> None:
        self.cancelled.update(self.requests)
