"""`tts-client`: talk to the token service from a shell.

    tts-client synthesize "Hello there. How are you?" -o out.wav [--voice V] [--stream-text]
               [--target host:port] [--format pcm16|float32|mulaw] [--sample-rate HZ] [--seed N]
    tts-client voices [--target host:port]

The target defaults to ``$TTS_TARGET`` or ``localhost:50051``. Tracing follows the standard
``OTEL_*`` variables (off when unset).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from tts_client.client import ENCODINGS, encoding_name, list_voices, make_config, synthesize
from tts_common.telemetry import Telemetry


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tts-client", description="Client of the Chatterbox TTS token service.")
    p.add_argument("--target", default=os.environ.get("TTS_TARGET", "localhost:50051"),
                   help="token service host:port [env TTS_TARGET; default localhost:50051]")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synthesize", help="text -> WAV file")
    s.add_argument("text", help='text to speak ("-" reads stdin)')
    s.add_argument("-o", "--output", default="out.wav", help="WAV file to write [out.wav]")
    s.add_argument("--voice", default="", help="voice name (see `tts-client voices`); default: the server's")
    s.add_argument("--stream-text", action="store_true", help="send the text a few words at a time, as an LLM would")
    s.add_argument("--words-per-piece", type=int, default=3, help="with --stream-text: words per piece [3]")
    s.add_argument("--piece-interval", type=float, default=0.05, help="with --stream-text: seconds between pieces [0.05]")
    s.add_argument("--format", choices=sorted(ENCODINGS), default="pcm16", help="audio encoding [pcm16]")
    s.add_argument("--sample-rate", type=int, default=0, help="Hz; 0 = 24000 (8000 for mulaw)")
    s.add_argument("--seed", type=int, default=None, help="reproducible sampling")
    s.add_argument("--max-new-tokens", type=int, default=None, help="cap on speech tokens per sentence (25 = 1 s)")
    s.add_argument("--temperature", type=float, default=None)
    s.add_argument("--timeout", type=float, default=None, help="deadline in seconds for the whole synthesis")
    sub.add_parser("voices", help="list the voices the token service has loaded")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    telemetry = Telemetry.from_env("tts-client")
    try:
        with grpc.insecure_channel(args.target) as channel:
            if args.command == "voices":
                resp = list_voices(channel)
                for v in resp.voices:
                    print(v.name + ("  (default)" if v.name == resp.default_voice else ""))
                return 0
            text = sys.stdin.read() if args.text == "-" else args.text
            config = make_config(voice=args.voice, encoding=args.format, sample_rate=args.sample_rate,
                                 seed=args.seed, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
            result = synthesize(channel, text, config, stream_text=args.stream_text,
                                words_per_piece=args.words_per_piece, piece_interval=args.piece_interval,
                                timeout=args.timeout, telemetry=telemetry)
    except grpc.RpcError as err:
        print(f"tts-client: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    finally:
        telemetry.shutdown()
    with open(args.output, "wb") as f:
        f.write(result.wav())
    print(describe(result, args.output))
    return 0


def describe(result, path: str) -> str:
    """A one-paragraph account of a synthesis: where, how long, how fast."""
    s = result.summary
    audio_s = result.samples / result.sample_rate if result.sample_rate else 0.0
    lines = [f"wrote {path}: {audio_s:.2f} s of {encoding_name(result.encoding)} audio at {result.sample_rate} Hz "
             f"in {len(result.chunks)} chunks"]
    if s is not None:
        lines.append(f"  sentences {s.sentences}, text tokens {s.text_tokens}, speech tokens {s.speech_tokens}")
        lines.append(f"  server: first audio after {s.time_to_first_audio_seconds:.3f} s, total {s.total_seconds:.3f} s, "
                     f"real-time factor {s.real_time_factor:.3f}")
    if result.first_audio_seconds is not None:
        lines.append(f"  client: first audio after {result.first_audio_seconds:.3f} s, total {result.total_seconds:.3f} s")
    if result.trace_id:
        lines.append(f"  trace id {result.trace_id}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
