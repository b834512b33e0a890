"""``python -m vocoder_service render``: speech tokens (JSON) -> WAV, offline or through a streaming session."""
from __future__ import annotations

import argparse
import json
import sys
import wave
from pathlib import Path

import numpy as np
import torch


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("render", help="render speech tokens to a WAV file with the PyTorch S3Gen")
    p.add_argument("--model", required=True, help="model folder (s3gen_meanflow.safetensors, conds.pt)")
    p.add_argument("--tokens", required=True, help="JSON file: a list of speech token ids (or {\"tokens\": [...]})")
    p.add_argument("--out", required=True, help="output WAV (mono, 16-bit, 24 kHz)")
    p.add_argument("--stream-chunk", type=int, default=0,
                   help="push the tokens N at a time through a streaming session (0: offline)")
    p.add_argument("--voice", default="default", help="voice name (conds.pt is 'default')")
    p.add_argument("--voices-dir", default=None)
    p.add_argument("--seed", type=int, default=0, help="noise seed (same seed: same audio offline and streamed)")
    p.set_defaults(func=run)


def read_tokens(path: str) -> list[int]:
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = data.get("tokens")
    if not isinstance(data, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in data):
        raise ValueError(f"{path}: expected a JSON list of integer speech token ids")
    return data


def write_wav(path: str, audio: np.ndarray, sample_rate: int) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


def run(args: argparse.Namespace) -> int:
    from .s3gen.loading import load_vocoder
    from .s3gen.streaming import StreamingSession

    tokens = read_tokens(args.tokens)
    model, voices = load_vocoder(args.model, args.voices_dir)
    if args.voice not in voices:
        raise SystemExit(f"unknown voice {args.voice!r}; available: {', '.join(sorted(voices))}")
    voice = voices[args.voice]
    if args.stream_chunk < 0:
        raise SystemExit("--stream-chunk must be >= 0")
    if args.stream_chunk:
        session = StreamingSession(model, voice, seed=args.seed)
        parts = [session.push(tokens[i:i + args.stream_chunk]) for i in range(0, len(tokens), args.stream_chunk)]
        parts.append(session.finish())
        session.close()
        audio = torch.cat(parts)
    else:
        audio = model.synthesize(tokens, voice, seed=args.seed)
    write_wav(args.out, audio.cpu().numpy(), model.cfg.sample_rate)
    print(f"wrote {args.out}: {audio.numel() / model.cfg.sample_rate:.2f} s, {len(tokens)} tokens", file=sys.stderr)
    return 0
