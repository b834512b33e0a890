"""Shared fixtures of the vocoder tests: a tiny model + voice (fast), and full-size pairs (slow)."""
from __future__ import annotations

import pytest
import torch

from vocoder_service.s3gen.config import S3GenConfig
from vocoder_service.s3gen.model import S3GenModel, VoiceCond

from tests.vocoder_service.helpers import random_voice


@pytest.fixture(scope="session")
def tiny_model() -> S3GenModel:
    torch.manual_seed(0)
    return S3GenModel(S3GenConfig.preset("tiny")).eval()


@pytest.fixture(scope="session")
def tiny_voice(tiny_model) -> VoiceCond:
    return random_voice(tiny_model.cfg)
