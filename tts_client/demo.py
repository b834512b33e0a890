"""`make demo`: both services on loopback, one streamed synthesis, one WAV, everything stopped again.

Model folder: ``$TTS_MODEL_DIR`` if set (real weights: real speech); otherwise a demo Turbo checkpoint
with random weights is created once in ``$DEMO_DIR`` (default .cache/demo-turbo) — it runs the whole
pipeline at full size, but its audio is noise. The services run as subprocesses
(``python -m vocoder_service serve`` / ``python -m token_service serve``) on free loopback ports, with
JSON logs under ``.cache/demo-logs/``. On CPU with random weights each sentence is capped at
``$DEMO_MAX_NEW_TOKENS`` speech tokens (default 40 = 1.6 s of audio; a random T3 never says "stop", so
without a cap every sentence would run to the 1001-token limit, minutes of CPU time at full size).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from tts_client.cli import describe
from tts_client.client import make_config, synthesize
from tts_client.health import wait_healthy

DEMO_TEXT = "Hello! This is Chatterbox Turbo, speaking through two streaming services."
READY_TIMEOUT_S = float(os.environ.get("DEMO_READY_TIMEOUT", "600"))


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_folder() -> tuple[Path, bool]:
    """(folder, is_demo): ``$TTS_MODEL_DIR``, or the demo checkpoint in ``$DEMO_DIR`` (created if missing)."""
    from tts_common.checkpoint import DEMO_MARKER

    configured = os.environ.get("TTS_MODEL_DIR", "").strip()
    if configured:
        is_demo = (Path(configured) / DEMO_MARKER).is_file()
        if is_demo:
            say(f"{configured} is a demo checkpoint (random weights): its audio is noise.")
        return Path(configured), is_demo

    demo = Path(os.environ.get("DEMO_DIR", "") or ".cache/demo-turbo")
    say("TTS_MODEL_DIR is not set: using a demo Turbo checkpoint with RANDOM weights.")
    say("  Its audio is NOISE - it shows the pipeline working at full size, not the voice.")
    say("  For real speech: download ResembleAI/chatterbox-turbo (e.g. `hf download ResembleAI/chatterbox-turbo "
        "--local-dir ~/chatterbox-turbo`) and run `make demo TTS_MODEL_DIR=~/chatterbox-turbo`.")
    if not (demo / DEMO_MARKER).is_file():
        from export.demo_checkpoint import write_demo_checkpoint

        say(f"creating the demo checkpoint in {demo} (once; ~3 GB) ...")
        t0 = time.perf_counter()
        write_demo_checkpoint(demo, "turbo", 0, force=demo.exists())
        say(f"  done in {time.perf_counter() - t0:.1f} s")
    else:
        say(f"demo checkpoint: {demo}")
    return demo, True


def start(module: str, env: dict, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")
    return subprocess.Popen([sys.executable, "-m", module, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def main() -> int:
    t_start = time.perf_counter()
    folder, is_demo = model_folder()
    logs = Path(os.environ.get("DEMO_LOGS", "") or ".cache/demo-logs")
    logs.mkdir(parents=True, exist_ok=True)
    out = Path(os.environ.get("DEMO_OUT", "out/demo.wav"))
    out.parent.mkdir(parents=True, exist_ok=True)
    vport, tport = free_port(), free_port()
    base = {**os.environ, "TTS_MODEL_DIR": str(folder), "TTS_LOG_FORMAT": "json", "TTS_DRAIN_SECONDS": "5"}
    voc_env = {**base, "TTS_LISTEN": f"127.0.0.1:{vport}", "TTS_MAX_STREAMS": "4"}
    tok_env = {**base, "TTS_LISTEN": f"127.0.0.1:{tport}", "TTS_VOCODER_TARGET": f"127.0.0.1:{vport}",
               "TTS_MAX_STREAMS": "4", "TTS_KV_SLOTS": os.environ.get("TTS_KV_SLOTS", "2")}
    max_new = None
    if is_demo:
        max_new = int(os.environ.get("DEMO_MAX_NEW_TOKENS", "40"))
        tok_env.setdefault("TTS_MAX_SEQ_LEN", "1024")
        tok_env["TTS_MAX_NEW_TOKENS"] = str(max(max_new, 64))
    procs: list[subprocess.Popen] = []
    try:
        say(f"starting the vocoder service on 127.0.0.1:{vport} and the token service on 127.0.0.1:{tport} "
            f"(logs: {logs}/)")
        t0 = time.perf_counter()
        procs.append(start("vocoder_service", voc_env, logs / "vocoder-service.log"))
        procs.append(start("token_service", tok_env, logs / "token-service.log"))
        deadline = time.monotonic() + READY_TIMEOUT_S
        wait_healthy(f"127.0.0.1:{vport}", procs[0], deadline - time.monotonic(), "vocoder service",
                     logs / "vocoder-service.log", interval_s=0.5)
        wait_healthy(f"127.0.0.1:{tport}", procs[1], deadline - time.monotonic(), "token service",
                     logs / "token-service.log", interval_s=0.5)
        say(f"both services healthy after {time.perf_counter() - t0:.1f} s (model loading included)")
        cap = f", at most {max_new} speech tokens per sentence (random weights never stop)" if max_new else ""
        say(f"synthesizing, text streamed a few words at a time{cap}:\n       {DEMO_TEXT!r}")
        with grpc.insecure_channel(f"127.0.0.1:{tport}") as channel:
            result = synthesize(channel, DEMO_TEXT, make_config(seed=0, max_new_tokens=max_new), stream_text=True,
                                timeout=900)
        out.write_bytes(result.wav())
        say(describe(result, str(out)))
        if is_demo:
            say("(random weights: the WAV is noise; set TTS_MODEL_DIR to real weights for speech)")
    except (RuntimeError, grpc.RpcError) as exc:
        detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
        say(f"FAILED: {detail}")
        return 1
    finally:
        stop(procs)
        say(f"services stopped; demo took {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
