"""Time upstream chatterbox-tts 0.1.7 (the reference) on the GPU: T3 tokens/s and S3Gen latency.

Used by bench/run_gpu.sh; can also run alone:  python bench/upstream_baseline.py [--model DIR]
Without --model the upstream modules keep their random init (timing only).
Prints one JSON object on the last line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_upstream(model_dir: str | None, device: str):
    """Return (t3, s3gen, conds) of upstream, on ``device``, fp32 eval."""
    if model_dir:
        from chatterbox.tts_turbo import ChatterboxTurboTTS

        tts = ChatterboxTurboTTS.from_local(model_dir, device)
        return tts.t3, tts.s3gen, tts.conds, tts.tokenizer
    from chatterbox.models.s3gen import S3Gen
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.models.t3.modules.t3_config import T3Config

    hp = T3Config(text_tokens_dict_size=50276)
    hp.llama_config_name = "GPT2_medium"
    hp.speech_tokens_dict_size = 6563
    hp.input_pos_emb = None
    hp.speech_cond_prompt_len = 375
    hp.use_perceiver_resampler = False
    hp.emotion_adv = False
    t3 = T3(hp).to(device).eval()
    s3 = S3Gen(meanflow=True).to(device).eval()
    g = torch.Generator().manual_seed(0)
    t3c = T3Cond(
        speaker_emb=torch.randn(1, 256, generator=g),
        cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 375), generator=g),
        emotion_adv=torch.zeros(1, 1, 1),
    ).to(device=device)
    gen = dict(
        prompt_token=torch.randint(0, 6561, (1, 250), generator=g).to(device),
        prompt_token_len=torch.tensor([250]).to(device),
        prompt_feat=torch.randn(1, 500, 80, generator=g).to(device) - 5.0,
        prompt_feat_len=None,
        embedding=torch.randn(1, 192, generator=g).to(device),
    )

    class C:  # noqa: D401 - tiny holder
        t3 = t3c
        pass

    C.gen = gen
    return t3, s3, C, None


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=200, help="speech tokens to decode for tokens/s")
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t3, s3, conds, _ = build_upstream(args.model, device)
    text = torch.randint(0, 50000, (1, args.text_tokens), generator=torch.Generator().manual_seed(1)).to(device)
    res: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}

    # T3: tokens/s at batch 1 (greedy-ish sampling as upstream's defaults; EOS may stop early).
    runs = []
    for i in range(args.repeats + 1):
        torch.manual_seed(i)
        _sync()
        t0 = time.perf_counter()
        toks = t3.inference_turbo(t3_cond=conds.t3, text_tokens=text, max_gen_len=args.tokens)
        _sync()
        dt = time.perf_counter() - t0
        if i:
            runs.append((toks.shape[1], dt))
    n = sum(r[0] for r in runs)
    res["t3_tokens_per_s_bs1"] = n / sum(r[1] for r in runs)
    res["t3_tokens_generated"] = [r[0] for r in runs]

    # S3Gen: offline utterances of 50 and 150 tokens (2 s and 6 s of audio).
    for ntok in (50, 150):
        st = torch.randint(0, 6561, (ntok,), generator=torch.Generator().manual_seed(2)).to(device)
        ts = []
        for i in range(args.repeats + 1):
            _sync()
            t0 = time.perf_counter()
            wav, _ = s3.inference(speech_tokens=st, ref_dict=conds.gen, n_cfm_timesteps=2)
            _sync()
            if i:
                ts.append(time.perf_counter() - t0)
        res[f"s3gen_s_{ntok}tok"] = sorted(ts)[len(ts) // 2]
        res[f"s3gen_audio_s_{ntok}tok"] = wav.shape[-1] / 24000
    if device == "cuda":
        res["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(json.dumps(res))


if __name__ == "__main__":
    main()
