"""VocoderServiceConfig: every setting of `tts-vocoder-service` (flags > ``TTS_*`` env > defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from tts_common.config import REQUIRED, ConfigError, check_positive, setting

VOCODER_ENGINES = ("pytorch", "onnxruntime", "tensorrt")
LOG_FORMATS = ("json", "text")
VOCODER_DTYPES = ("auto", "float32", "float16", "bfloat16")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass
class VocoderServiceConfig:
    """Vocoder service (S3Gen): speech tokens in, 24 kHz audio out, many streaming sessions at once."""

    listen: str = setting("0.0.0.0:50052", "host:port to serve gRPC on")
    model_dir: str = setting(REQUIRED, "model folder (upstream layout: s3gen_meanflow.safetensors, conds.pt)")
    voices_dir: str | None = setting(None, "extra voices as <name>.pt (conds.pt format); default <model-dir>/voices (if it exists)")
    engine: str = setting("pytorch", "S3Gen engine backend", choices=VOCODER_ENGINES)
    engine_dir: str | None = setting(None, "ONNX / TensorRT engine folder (engine=onnxruntime|tensorrt)")
    device: str = setting("auto", "torch device: auto, cpu, cuda, cuda:N")
    dtype: str = setting("auto", "S3Gen flow dtype: auto (= float32), float32, float16, bfloat16; HiFT stays float32",
                         choices=VOCODER_DTYPES)
    cuda_graphs: bool = setting(False, "S3Gen streaming steps through CUDA graphs, one per chunk shape (CUDA only)")
    max_streams: int = setting(128, "concurrent Vocode sessions; more get RESOURCE_EXHAUSTED")
    max_batch: int = setting(64, "most sessions stepped together on the device")
    hold_pushes: bool = setting(True, "sessions keep token pushes that cannot produce audio yet, so the engine sees "
                                      "one call per step, not per token (off: TTFA p50 3.6 s at 64 streams)")
    vocoder_urgent_slack_s: float = setting(0.5, "deadline-aware steps: a session whose client has less than this many seconds "
                                                 "of audio buffered (or no audio yet) is urgent; a step with urgent calls takes "
                                                 "them first and few others (TTFA under load); 0 = FIFO steps")
    vocoder_urgent_fill: int = setting(4, "most non-urgent sessions a step with urgent ones also takes (deadline-aware steps)")
    vocoder_max_defer_ms: float = setting(2000.0, "deadline-aware steps: a call that has waited this long goes in the next "
                                                  "step whatever its slack (no call waits forever)")
    noise_on_host: bool = setting(False, "hash the flow / source noise on the host and copy it (costs ~2-8 ms of host "
                                         "time per row and step; default: on the device, ~0.1 ms per row)")
    pad_flow_windows: bool = setting(True, "pad every flow window (masked) to one shape, so sessions at different "
                                           "stream phases share one flow batch; false: only equal shapes batch")
    chunk_tokens: int = setting(25, "tokens per streaming step once the first chunks have grown (4, 8, 16, then this): "
                                     "larger steps carry more audio per flow window (higher throughput, coarser pacing)")
    cuda_stack_bytes: int = setting(0, "CUDA per-thread stack limit in bytes set at start-up (the driver reserves it for every thread the GPU "
                                      "can hold: 1024, the driver default, is ~270 MB of an H100; 256 saves ~200 MB per process); "
                                      "0 = leave the driver default")
    graph_batch: int = setting(32, "largest batch captured as one CUDA graph (1, 2, 4, 8, 16, 32 or 64); larger "
                                   "batches replay it in slices. Sets the graph memory pool (cuda_graphs only)")
    drain_seconds: float = setting(20.0, "on SIGTERM: seconds in-flight streams may take to finish")
    log_level: str = setting("INFO", "log level: DEBUG, INFO, WARNING, ERROR")
    log_format: str = setting("json", "log format", choices=LOG_FORMATS)
    stats_log_s: float = setting(0.0, "log the engine statistics (worker steps, rows, queue waits, idle) as one JSON line every "
                                      "this many seconds while busy, and once at shutdown; 0 = off")
    max_message_bytes: int = setting(4 * 1024 * 1024, "largest gRPC message accepted from a caller, in bytes (larger ones get RESOURCE_EXHAUSTED)")

    def validate(self) -> None:
        """Fill derived defaults and reject impossible values (raises ``ConfigError``)."""
        self.log_level = self.log_level.upper()
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)} (--log-level / TTS_LOG_LEVEL)")
        if self.engine in ("onnxruntime", "tensorrt") and not self.engine_dir:
            raise ConfigError(f"engine={self.engine} needs --engine-dir / TTS_ENGINE_DIR")
        check_positive(self, "max_streams", "max_batch", "max_message_bytes", "chunk_tokens")
        check_positive(self, "cuda_stack_bytes", allow_zero=True)
        check_positive(self, "drain_seconds", "stats_log_s", "vocoder_urgent_slack_s", "vocoder_urgent_fill",
                       allow_zero=True)
        check_positive(self, "vocoder_max_defer_ms")
