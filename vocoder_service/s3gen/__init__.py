"""S3Gen in our own PyTorch modules: tokens -> mel (conformer + meanflow) -> 24 kHz audio (HiFT)."""
from .accel import prepare_s3gen, warm_up_streaming
from .config import S3GenConfig
from .model import S3GenModel, VoiceCond
from .streaming import (SessionClosed, SessionFinished, StreamConfig, StreamingSession, finish_batch, push_batch,
                        stream_step)

__all__ = ["S3GenConfig", "S3GenModel", "VoiceCond", "StreamConfig", "StreamingSession", "SessionClosed",
           "SessionFinished", "stream_step", "push_batch", "finish_batch", "prepare_s3gen", "warm_up_streaming"]
