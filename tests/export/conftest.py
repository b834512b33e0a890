"""Fixtures for the export tests: small model folders and a reference T3 forward."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from token_service.t3.config import T3Config
from token_service.t3.model import KVCache, T3Model


def write_random_t3_folder(folder: Path, preset: str = "tiny", seed: int = 0) -> Path:
    """A model folder with random T3 weights of ``preset`` and a random ``conds.pt`` voice."""
    cfg = T3Config.preset(preset)
    torch.manual_seed(seed)
    model = T3Model(cfg)
    for p in model.parameters():  # spread values so logits differ visibly between ids
        torch.nn.init.normal_(p, std=0.05)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / cfg.weights_file))
    from export.demo_checkpoint import demo_voice
    from tts_common.conds import save_voice

    save_voice(demo_voice(seed), folder / "conds.pt")
    (folder / "voices").mkdir(exist_ok=True)
    save_voice(demo_voice(seed + 1), folder / "voices" / "alt.pt")
    return folder


@pytest.fixture(scope="session")
def tiny_t3_dir(tmp_path_factory) -> Path:
    return write_random_t3_folder(tmp_path_factory.mktemp("tiny_t3"), "tiny")


@torch.no_grad()
def reference_speech_logits(model: T3Model, prefix: torch.Tensor, text_ids: list[int],
                            speech_ids: list[int]) -> torch.Tensor:
    """T3 engine forward over ``[prefix | text | speech]`` → speech logits ``(len(text)+len(speech), V_speech)``."""
    emb = torch.cat([prefix, model.text_emb(torch.tensor(text_ids)), model.speech_emb(torch.tensor(speech_ids))])
    T = emb.shape[0]
    cache = KVCache(model.cfg, 1, T)
    hidden = model.forward_embeds(emb[None], torch.arange(T)[None], cache.view(slice(0, 1)))
    return model.speech_logits(hidden[0, prefix.shape[0]:])
