"""TokenServiceConfig: every setting of `tts-token-service` (flags > ``TTS_*`` env > defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from tts_common.config import REQUIRED, ConfigError, check_positive, setting

TOKEN_ENGINES = ("pytorch", "trtllm")
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass
class TokenServiceConfig:
    """Token service (T3): text in, speech tokens to the vocoder service, audio relayed back."""

    listen: str = setting("0.0.0.0:50051", "host:port to serve gRPC on")
    model_dir: str = setting(REQUIRED, "model folder (upstream layout: t3_turbo_v1.safetensors, conds.pt, tokenizer files)")
    voices_dir: str | None = setting(None, "extra voices as <name>.pt (conds.pt format); default <model-dir>/voices (if it exists)")
    vocoder_target: str = setting("localhost:50052", "host:port of the vocoder service")
    vocoder_min_tokens: int = setting(1, "a token message to the vocoder waits until it holds this many tokens "
                                         "(at most vocoder_max_wait_ms); 1 = send as they come")
    vocoder_max_wait_ms: float = setting(0.0, "longest wait for vocoder_min_tokens, in ms (0 = no wait)")
    engine: str = setting("pytorch", "T3 engine backend", choices=TOKEN_ENGINES)
    engine_dir: str | None = setting(None, "TensorRT-LLM engine folder (engine=trtllm)")
    device: str = setting("auto", "torch device: auto, cpu, cuda, cuda:N")
    dtype: str = setting("auto", "weights dtype: auto, float32, float16, bfloat16")
    max_streams: int = setting(64, "concurrent Synthesize/StreamTokens streams; more get RESOURCE_EXHAUSTED")
    drain_seconds: float = setting(20.0, "on SIGTERM: seconds in-flight streams may take to finish")
    log_level: str = setting("INFO", "log level: DEBUG, INFO, WARNING, ERROR")
    log_format: str = setting("json", "log format", choices=LOG_FORMATS)
    max_text_chars: int = setting(20000, "most characters of text one stream may send; more get INVALID_ARGUMENT")
    max_new_tokens: int = setting(1001, "default and upper cap on speech tokens per sentence (25 per second of audio; upstream: 1001)")
    kv_slots: int = setting(0, "KV-cache slots of the pytorch engine (static memory per slot); 0 = max-streams")
    max_seq_len: int = setting(2048, "positions per KV slot: voice prefix + text + speech tokens")
    compile: bool = setting(False, "pytorch engine: torch.compile the T3 decode step (compiles at start-up, "
                                   "before CUDA-graph capture; falls back to eager with a warning if it fails)")
    stats_log_s: float = setting(0.0, "log the engine statistics (steps, tokens, slots) as one JSON line every "
                                      "this many seconds while busy, and once at shutdown; 0 = off")
    t3_kernels: str = setting("auto", "pytorch engine: T3 decode step for batches of 1-2 rows: triton (fused kernels, one "
                                      "CUDA graph per batch size; falls back to torch with a warning if they fail), torch "
                                      "(cuBLAS/cuDNN), or auto (triton on CUDA, torch elsewhere)",
                           choices=("auto", "torch", "triton"))
    t3_overlap_steps: bool = setting(True, "pytorch engine: queue T3 decode step N+1 on the device before reading step "
                                           "N's ids (host work overlaps the GPU; same tokens; each request reserves one "
                                           "more KV position; H100 batch 1: 1150 -> 1249 tokens/s)")
    t3_overlap_depth: int = setting(1, "pytorch engine, with t3_overlap_steps: decode steps queued on the device ahead of "
                                       "the one whose ids are read (1 = step N+1; 2 = N+1 and N+2: more host jitter "
                                       "hidden); each request reserves this many more KV positions")
    kv_first_group: int = setting(8, "pytorch engine: KV slots allocated (and CUDA graphs captured) at start-up; more "
                                     "come in groups of this size, then doubling, as load needs them. Each group is one "
                                     "more decode launch per step (its weights read again): 0 = all kv-slots as one "
                                     "group at start-up (highest throughput at many streams, most memory)")
    cuda_stack_bytes: int = setting(0, "CUDA per-thread stack limit in bytes set at start-up (the driver reserves it for every thread the GPU "
                                      "can hold: 1024, the driver default, is ~270 MB of an H100; 256 saves ~200 MB per process); "
                                      "0 = leave the driver default")
    prefill_rows: int = setting(4, "pytorch engine (CUDA): requests prefilled together in one staged run; the staging "
                                   "rows hold voice prefix + text (~62 MB each for Turbo): 1 = least memory, more = "
                                   "higher arrival throughput")
    max_message_bytes: int = setting(4 * 1024 * 1024, "largest gRPC message accepted from a caller, in bytes (larger ones get RESOURCE_EXHAUSTED)")

    def validate(self) -> None:
        """Fill derived defaults and reject impossible values (raises ``ConfigError``)."""
        self.log_level = self.log_level.upper()
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)} (--log-level / TTS_LOG_LEVEL)")
        if self.engine == "trtllm" and not self.engine_dir:
            raise ConfigError("engine=trtllm needs --engine-dir / TTS_ENGINE_DIR")
        check_positive(self, "max_streams", "max_text_chars", "max_new_tokens", "max_message_bytes", "vocoder_min_tokens")
        check_positive(self, "drain_seconds", "stats_log_s", "kv_slots", "vocoder_max_wait_ms", "kv_first_group", "cuda_stack_bytes", allow_zero=True)
        check_positive(self, "max_seq_len", "t3_overlap_depth", "prefill_rows")
