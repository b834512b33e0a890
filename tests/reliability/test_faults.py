"""Faults against real servers on loopback (tiny demo checkpoint), each with its expected status,
recovery without a restart of the other service, and zero leaked KV slots / vocoder sessions.

Scenarios: vocoder SIGKILLed mid-stream and restarted; a delayed and a frozen link between the
services (tcp_proxy.StallProxy); a client that stops reading; cancels and deadlines at any point;
SIGTERM to both service processes during streams.
"""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time

import grpc
import pytest
from clients import (LONG_TEXT, MAX_NEW, config, requests, run, same_audio, start_streams, sync_synthesize, synthesize,
                     wait_until)
from harness import RunningService
from tcp_proxy import StallProxy

from bench.service_load import ServiceProcesses, wait_healthy
from tts_api.v1 import token_service_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TEXT = "Hello there, friend. This is a reliability test!"


def _ok(outcome, sentences=None):
    assert outcome.code == "OK", (outcome.code, outcome.details)
    s = outcome.summary
    assert s is not None and s.audio_samples == outcome.samples == 960 * s.speech_tokens > 0
    if sentences is not None:
        assert s.sentences == sentences


def test_vocoder_sigkilled_mid_stream_then_restarted(real_pair, tiny_engines, demo_tiny_dir, tmp_path):
    procs = ServiceProcesses(demo_tiny_dir, device="cpu", max_streams=8, log_dir=tmp_path)
    procs.start_vocoder()
    try:
        wait_healthy(procs.vocoder_target, procs.vocoder, 120, "vocoder service", tmp_path / "vocoder-service.log")
        pair = real_pair(vocoder_target=procs.vocoder_target)
        _ok(run(synthesize(pair.token.target, TEXT, timeout=60)), sentences=2)

        killed_at = []

        def kill():
            procs.vocoder.send_signal(signal.SIGKILL)
            killed_at.append(time.perf_counter())

        out = run(synthesize(pair.token.target, LONG_TEXT, timeout=60, on_first_audio=kill))
        assert out.code == "UNAVAILABLE", (out.code, out.details)
        assert "vocoder service at" in out.details and procs.vocoder_target in out.details, out.details
        assert out.chunks >= 1  # audio was flowing when it died
        assert time.perf_counter() - killed_at[0] < 10
        procs.vocoder.wait(10)
        pair.assert_idle()  # the KV slot went back at once

        # while it is down: a clear UNAVAILABLE at once, no hang
        t0 = time.perf_counter()
        # (sync client: the refusal can come while the client still writes, grpc/grpc#36066; see clients.py)
        down = sync_synthesize(pair.token.target, TEXT, timeout=30)
        assert down.code == "UNAVAILABLE" and "vocoder service" in down.details, (down.code, down.details)
        assert time.perf_counter() - t0 < 10
        pair.assert_idle()

        # a vocoder comes back on the same address; the token service recovers without a restart
        pair.vocoder = RunningService("vocoder", tiny_engines[1], {"listen": procs.vocoder_target})
        t_back = time.perf_counter()
        assert wait_until(lambda: run(synthesize(pair.token.target, "Back again.", timeout=30)).code == "OK", 30, 0.2)
        recovery = time.perf_counter() - t_back
        print(f"recovered {recovery:.2f} s after the vocoder came back")
        _ok(run(synthesize(pair.token.target, TEXT, timeout=60)), sentences=2)
        pair.assert_idle()
    finally:
        procs.stop()


def test_delayed_and_frozen_link_between_services(real_pair):
    pair = real_pair()
    proxy = StallProxy(pair.vocoder.target).start()
    try:
        via = real_pair(vocoder_target=proxy.target)
        via.vocoder = pair.vocoder  # same vocoder, reached through the proxy (its stats are asserted)
        ref = run(synthesize(via.token.target, TEXT, timeout=60))
        _ok(ref, sentences=2)

        proxy.delay = 0.1  # a slow link: slower, still correct
        slow = run(synthesize(via.token.target, TEXT, timeout=60))
        _ok(slow, sentences=2)
        assert same_audio(slow.data, ref.data)
        proxy.delay = 0.0

        # frozen mid-stream: the client's deadline ends it (propagated to the vocoder call), no hang
        deadline = 4.0
        out = run(synthesize(via.token.target, LONG_TEXT, timeout=deadline, on_first_audio=proxy.freeze), timeout=30)
        assert out.code == "DEADLINE_EXCEEDED", (out.code, out.details)
        assert out.seconds < deadline + 2
        t = via.token.wait_idle(5)
        assert t["active"] == 0 and t["active_streams"] == 0, t  # KV slot freed at the deadline
        # the vocoder got the same deadline, so its session ends too though the cancel cannot reach it
        v = via.vocoder.wait_idle(10)
        assert v["active_sessions"] == 0 and v["active_streams"] == 0, v

        proxy.thaw()  # the link comes back: next request works, nothing restarted
        again = run(synthesize(via.token.target, TEXT, timeout=60))
        _ok(again, sentences=2)
        assert same_audio(again.data, ref.data)
        via.assert_idle()
    finally:
        proxy.stop()


def test_client_that_stops_reading_is_held_back_not_buffered(real_pair, tiny_engines):
    """A client reads one chunk and stops. The server's bounded queues and HTTP/2 flow control hold the
    vocoder back: the audio it makes plateaus far below what the text would produce (what is buffered
    per stalled stream is bounded), and a cancel frees everything.

    The client turns off BDP probing (a 64 KiB receive window), so what the test sees is the server's
    own buffering; a client with a large window buffers more in its own memory, not the server's."""
    token_engine, vocoder_engine = tiny_engines
    pair = real_pair(token_cfg={"max_text_chars": 20000})
    n = 400
    text = " ".join(f"Sentence {i} goes on for a while." for i in range(n))  # n sentences x (20 + 3) tokens
    total_tokens = n * (MAX_NEW + 3)
    before = vocoder_engine.stats()["tokens"]
    with grpc.insecure_channel(pair.token.target, options=[("grpc.http2.bdp_probe", 0)]) as ch:
        stub = token_service_pb2_grpc.TokenServiceStub(ch)
        from tts_client.client import make_config, synthesis_requests

        call = stub.Synthesize(synthesis_requests(text, make_config(seed=3)), timeout=150)
        next(call)  # one chunk read; the client reads nothing more

        def vocoded():
            return vocoder_engine.stats()["tokens"] - before

        samples = []
        while True:  # wait for a plateau: the vocoder took no new token for 1.5 s
            samples.append(vocoded())
            time.sleep(0.5)
            if len(samples) >= 4 and samples[-1] == samples[-4]:
                break
            assert len(samples) < 200, f"the vocoder never stopped: {samples[-5:]}"
        held = vocoded()
        time.sleep(2.0)
        assert vocoded() == held  # still stalled: nothing grows
        assert held < total_tokens / 2, (held, total_tokens)
        print(f"stalled client: the vocoder stopped after {held} of {total_tokens} tokens "
              f"({held / 25:.1f} s of audio made ahead of the client), T3 generated {token_engine.stats()['tokens']}")
        stats = pair.token.stats()
        assert stats["active_streams"] == 1 and stats["active"] <= 1  # one stream, at most one KV slot
        assert pair.vocoder.stats()["active_sessions"] == 1
        call.cancel()
    pair.assert_idle()
    _ok(run(synthesize(pair.token.target, TEXT, timeout=60)), sentences=2)
    pair.assert_idle()


def test_cancels_and_deadlines_at_any_point(real_pair):
    """Twelve concurrent streams, each cancelled or timed out at a different point (before the config,
    while text is still arriving, mid-audio): each ends with its status; nothing leaks; next one works."""
    pair = real_pair(token_cfg={"max_streams": 16, "kv_slots": 8}, vocoder_cfg={"max_streams": 16})

    async def cancelled_after(delay: float):
        async with grpc.aio.insecure_channel(pair.token.target) as ch:
            call = token_service_pb2_grpc.TokenServiceStub(ch).Synthesize(
                requests(LONG_TEXT, config(seed=int(delay * 1000)), gap=0.02), timeout=60)

            async def consume():
                async for _ in call:
                    pass

            task = asyncio.ensure_future(consume())
            await asyncio.sleep(delay)
            call.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except grpc.aio.AioRpcError as err:
                return f"{err.code().name} after {delay} s: {err.details()}"
            code = (await asyncio.wait_for(call.code(), 10)).name
            return code if code == "CANCELLED" else f"{code} after {delay} s: {await call.details()}"

    async def deadline(seconds: float):
        # the text arrives over ~4 s (27 pieces, 0.15 s apart), so no deadline below can be met
        # however fast the engines are: the outcome never depends on the machine's speed
        cfg = config(seed=7)
        out = await synthesize(pair.token.target, LONG_TEXT, timeout=seconds, cfg=cfg,
                               request_iter=requests(LONG_TEXT, cfg, gap=0.15))
        return out.code if out.code == "DEADLINE_EXCEEDED" else f"{out.code} with deadline {seconds} s: {out.details}"

    async def storm():
        rnd = random.Random(0)
        jobs = [cancelled_after(d) for d in (0.0, 0.01, 0.05, 0.2, 0.5, 1.0)]
        jobs += [deadline(d) for d in (0.05, 0.1, 0.3, 0.8, 1.5, 2.5)]
        rnd.shuffle(jobs)
        return await asyncio.gather(*jobs)

    codes = run(storm(), timeout=90)
    assert sorted(codes) == ["CANCELLED"] * 6 + ["DEADLINE_EXCEEDED"] * 6, "\n".join(codes)
    server_side = {p.attributes["status"]: p.value for p in pair.token.tel.metric("tts.streams")}
    assert set(server_side) <= {"CANCELLED", "DEADLINE_EXCEEDED"}, server_side  # never INTERNAL
    pair.assert_idle()
    _ok(run(synthesize(pair.token.target, TEXT, timeout=60)), sentences=2)
    pair.assert_idle()


def test_sigterm_during_streams_drains_then_exits(demo_tiny_dir, tmp_path):
    """SIGTERM to both processes while streams run: in-flight streams finish with their audio, new
    ones get UNAVAILABLE, both processes exit 0 within the grace period."""
    procs = ServiceProcesses(demo_tiny_dir, device="cpu", max_streams=8, log_dir=tmp_path, drain_seconds=20,
                             token_flags=["--max-new-tokens", str(MAX_NEW), "--kv-slots", "4", "--max-seq-len", "1024"])
    with procs:
        target = procs.token_target
        text = " ".join(f"Sentence {i} of the drain test." for i in range(6))
        refused: list = []
        signalled = threading.Event()

        async def scenario():
            # text keeps arriving (LLM pace) after the signal: admitted streams must still finish
            flights = await start_streams(target, text, (1, 2), gap=0.05)
            procs.token.send_signal(signal.SIGTERM)
            procs.vocoder.send_signal(signal.SIGTERM)
            signalled.set()
            t_sig = time.perf_counter()
            await asyncio.sleep(0.3)
            refused.append(await synthesize(target, TEXT, timeout=10))
            done = await asyncio.gather(*flights)
            return done, time.perf_counter() - t_sig

        done, drain_s = run(scenario(), timeout=90)
        for out in done:
            _ok(out, sentences=6)
        assert refused[0].code == "UNAVAILABLE", (refused[0].code, refused[0].details)
        codes = {"token": procs.token.wait(30), "vocoder": procs.vocoder.wait(30)}
        assert codes == {"token": 0, "vocoder": 0}, codes
        print(f"in-flight streams finished {drain_s:.2f} s after SIGTERM")
    for name in ("token-service", "vocoder-service"):
        log = (tmp_path / f"{name}.log").read_text()
        assert '"draining"' in log and '"stopped"' in log, log[-2000:]


def test_frozen_link_without_client_deadline_is_detected_by_keepalive(real_pair, monkeypatch):
    """No client deadline: the token service's keepalive on the vocoder link notices a frozen link and
    ends the stream with UNAVAILABLE (it used to hang for as long as the link stayed frozen). A quiet but
    healthy link is not cut: a client that pauses reading for a while still gets all its audio."""
    import token_service.server as token_server

    monkeypatch.setattr(token_server, "VOCODER_KEEPALIVE_MS", 1000)  # 10 s in production; 1 s + 0.5 s here
    pair = real_pair()
    proxy = StallProxy(pair.vocoder.target).start()
    try:
        via = real_pair(vocoder_target=proxy.target)
        via.vocoder = pair.vocoder
        ref = run(synthesize(via.token.target, LONG_TEXT, timeout=60))
        _ok(ref)

        # healthy but quiet: pings are answered, nothing is cut while the client pauses for 4 s
        with grpc.insecure_channel(via.token.target, options=[("grpc.http2.bdp_probe", 0)]) as ch:
            from tts_client.client import synthesis_requests

            call = token_service_pb2_grpc.TokenServiceStub(ch).Synthesize(synthesis_requests(LONG_TEXT, config()), timeout=60)
            first = next(call)
            time.sleep(4.0)
            rest = list(call)
        data = first.audio.data + b"".join(r.audio.data for r in rest if r.WhichOneof("kind") == "audio")
        assert rest[-1].WhichOneof("kind") == "summary" and same_audio(data, ref.data)

        # frozen, no deadline anywhere: UNAVAILABLE after about keepalive time + timeout
        out = run(synthesize(via.token.target, LONG_TEXT, timeout=None, on_first_audio=proxy.freeze), timeout=60)
        assert out.code == "UNAVAILABLE" and "vocoder service" in out.details, (out.code, out.details)
        assert out.seconds < 15, out.seconds
        t = via.token.wait_idle(5)
        assert t["active"] == 0 and t["active_streams"] == 0, t
        proxy.thaw()  # the token side closed its connection; once bytes flow the vocoder sees it and frees the session
        v = via.vocoder.wait_idle(15)
        assert v["active_sessions"] == 0 and v["active_streams"] == 0, v
        _ok(run(synthesize(via.token.target, TEXT, timeout=60)), sentences=2)
        via.assert_idle()
        print(f"frozen link detected after {out.seconds:.1f} s without any deadline")
    finally:
        proxy.stop()
