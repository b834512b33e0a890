"""Write export/manifests/*.json: every state-dict key upstream 0.1.7 expects, with shape and dtype.

Run from the repository root (needs the dev environment with upstream installed):

    .venv/bin/python tests/upstream/dump_manifests.py

One manifest per model file.  Each is ``{"source": ..., "keys": {name: {"shape": [...],
"dtype": "float32", "kind": "param"|"buffer"}}}`` in upstream's state-dict order.

Nano: upstream 0.1.7 has no nano switch.  Its ``T3`` builds the backbone from
``LLAMA_CONFIGS[hp.llama_config_name]``; we register a ``"GPT2_small"`` entry (GPT-2 small:
12 layers, 768 wide, 12 heads, Turbo's 50276-token vocabulary) and otherwise use Turbo's
hyper-parameters.  tests/export/test_demo_checkpoint.py loads ``t3_nano_v1.safetensors`` into
exactly that module strictly (``upstream_t3_nano``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from upstream_oracle import upstream_module  # noqa: E402

OUT = ROOT / "export" / "manifests"


def turbo_hp(llama_config_name: str = "GPT2_medium"):
    """Upstream's Turbo T3 hyper-parameters, as ``ChatterboxTurboTTS.from_local`` sets them."""
    T3Config = upstream_module("models.t3.modules.t3_config").T3Config
    hp = T3Config(text_tokens_dict_size=50276)
    hp.llama_config_name = llama_config_name
    hp.speech_tokens_dict_size = 6563
    hp.input_pos_emb = None
    hp.speech_cond_prompt_len = 375
    hp.use_perceiver_resampler = False
    hp.emotion_adv = False
    return hp


def register_gpt2_small() -> None:
    """Add a ``GPT2_small`` backbone config to upstream's config table (idempotent)."""
    configs = upstream_module("models.t3.llama_configs").LLAMA_CONFIGS
    if "GPT2_small" not in configs:
        cfg = dict(configs["GPT2_medium"])
        cfg.update(n_embd=768, hidden_size=768, n_head=12, n_layer=12)
        configs["GPT2_small"] = cfg


def upstream_t3(preset: str) -> torch.nn.Module:
    """Upstream's T3 for ``turbo`` or ``nano`` (see module docstring for nano)."""
    T3 = upstream_module("models.t3.t3").T3
    if preset == "nano":
        register_gpt2_small()
        return T3(turbo_hp("GPT2_small"))
    return T3(turbo_hp())


def manifest(module: torch.nn.Module, source: str) -> dict:
    params = {n for n, _ in module.named_parameters()}
    keys = {}
    for name, t in module.state_dict().items():
        keys[name] = {
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "kind": "param" if name in params else "buffer",
        }
    return {"source": source, "keys": keys}


def write(name: str, data: dict) -> None:
    path = OUT / name
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{path.relative_to(ROOT)}: {len(data['keys'])} keys")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    write("t3_turbo_v1.json", manifest(upstream_t3("turbo"), "chatterbox 0.1.7 T3(turbo hp, GPT2_medium)"))
    write("t3_nano_v1.json", manifest(upstream_t3("nano"), "chatterbox 0.1.7 T3(turbo hp, GPT2_small registered)"))
    S3Gen = upstream_module("models.s3gen").S3Gen
    write("s3gen_meanflow.json", manifest(S3Gen(meanflow=True), "chatterbox 0.1.7 S3Gen(meanflow=True)"))
    VoiceEncoder = upstream_module("models.voice_encoder").VoiceEncoder
    write("ve.json", manifest(VoiceEncoder(), "chatterbox 0.1.7 VoiceEncoder()"))


if __name__ == "__main__":
    main()
