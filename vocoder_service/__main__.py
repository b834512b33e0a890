"""``python -m vocoder_service <command>``: ``render`` (tokens -> WAV) and ``serve`` (the gRPC server)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":  # the server parses its own flags
        from .server import main as serve_main

        return int(serve_main(argv[1:]) or 0)
    parser = argparse.ArgumentParser(prog="python -m vocoder_service")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{render,serve}")
    from . import render

    render.add_parser(sub)
    sub.add_parser("serve", help="run the vocoder gRPC server (see `serve --help`)")
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
