"""``tts-export``: one command, one subcommand per export step.

Each subcommand lives in its own module with a ``register(subparsers)`` function that adds its
parser and sets ``func`` (``args.func(args) -> int`` runs it). To add one, write the module and
append its name to :data:`SUBCOMMANDS`. Keep heavy imports (TensorRT, onnx, ...) inside the
``func``, so ``tts-export --help`` works where they are not installed.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

SUBCOMMANDS: list[str] = [
    "export.demo_checkpoint",
    "export.pipeline",  # trtllm, voice-prefix, all
    "export.validate",  # validate
    "export.s3gen_onnx",  # onnx
    "export.tensorrt_build",  # tensorrt-scripts
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tts-export", description="Chatterbox serving export toolchain.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileExistsError, ValueError, RuntimeError) as e:
        print(f"tts-export {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
