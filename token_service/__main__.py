"""``python -m token_service <command>``: ``generate`` (debugging tool); the server adds ``serve``.

Subcommands are registered in :data:`COMMANDS` as ``name -> (add_arguments, run)``, or in
:data:`PASSTHROUGH` as ``name -> module`` whose ``main(argv)`` parses its own flags (``serve``).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (upstream layout)")
    p.add_argument("--text", required=True, help="text to speak")
    p.add_argument("--voice", default="default", help="voice name (default: the folder's conds.pt)")
    p.add_argument("--voices-dir", default=None, help="extra voices folder (default: <model>/voices)")
    p.add_argument("--max-new-tokens", type=int, default=1001, help="cap on sampled tokens (upstream: 1001)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=1000)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.2)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (float32)")


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .t3.generate import stream_speech_tokens
    from .t3.loader import load_t3, load_voice_conds_all
    from .t3.sampling import SamplingParams
    from .t3.text import TextTokenizer
    from .t3.voice import build_voice_prefix

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                            seed=args.seed)
    model = load_t3(args.model).drop_unused().to(torch.device(args.device))
    voices = load_voice_conds_all(args.model, args.voices_dir, model.cfg.prompt_len)
    if args.voice not in voices:
        raise ValueError(f"unknown voice {args.voice!r}; available: {', '.join(sorted(voices))}")
    ids = TextTokenizer(args.model).tokenize(args.text)
    prefix = build_voice_prefix(model, voices[args.voice], args.voice)
    print(json.dumps(list(stream_speech_tokens(model, prefix, ids, params))))
    return 0


COMMANDS: dict[str, Command] = {"generate": (_generate_args, _generate)}


# Subcommands whose module parses its own flags: ``serve`` -> ``token_service.server.main(argv)``;
# ``serve-colocated``: token + vocoder service in one process (token_service/colocated.py).
PASSTHROUGH: dict[str, str] = {"serve": "token_service.server", "serve-colocated": "token_service.colocated"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        import importlib

        return int(importlib.import_module(PASSTHROUGH[argv[0]]).main(argv[1:]) or 0)
    parser = argparse.ArgumentParser(prog="python -m token_service")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in PASSTHROUGH.items():
        sub.add_parser(name, help=f"see `python -m token_service {name} --help` ({module})", add_help=False)
    for name, (add, _) in COMMANDS.items():
        add(sub.add_parser(name))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
