"""Overload: beyond the stream limit new streams are refused at once; admitted streams are unaffected.

Policy (tts_common/grpc_server.py ``Admission``): no queue at the gRPC layer. Beyond
``TTS_MAX_STREAMS`` open streams a new one gets RESOURCE_EXHAUSTED immediately, with a message naming
the limit; clients retry with backoff (or go to another replica). The same holds for the vocoder
service's own limit, which the token service passes on as RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from clients import config, run, start_streams, sync_synthesize, synthesize

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TEXT = " ".join(f"Admitted stream sentence {i} keeps talking." for i in range(5))


def test_stream_limit_refuses_at_once_and_admitted_streams_are_unaffected(real_pair):
    pair = real_pair(token_cfg={"max_streams": 2})
    target = pair.token.target
    # references: each admitted stream alone, before any load
    refs = [run(synthesize(target, TEXT, timeout=60, cfg=config(seed=s))) for s in (11, 12)]
    for r in refs:
        assert r.code == "OK" and r.samples > 0, (r.code, r.details)

    async def scenario():
        admitted = await start_streams(target, TEXT, (11, 12), gap=0.03)
        t0 = time.perf_counter()
        extra = await asyncio.gather(*(asyncio.to_thread(sync_synthesize, target, "Let me in.", timeout=10,
                                                         cfg=config(seed=s)) for s in range(6)))
        refused_in = time.perf_counter() - t0
        return await asyncio.gather(*admitted), extra, refused_in

    admitted, extra, refused_in = run(scenario(), timeout=120)
    for out in extra:
        assert out.code == "RESOURCE_EXHAUSTED", (out.code, out.details)
        assert "2 of 2" in out.details and "TTS_MAX_STREAMS" in out.details, out.details
        assert out.seconds < 2.0
    assert refused_in < 3.0
    print(f"6 extra streams refused in {refused_in * 1000:.0f} ms (all of them)")
    for out, ref in zip(admitted, refs):
        assert out.code == "OK", (out.code, out.details)
        assert out.summary.sentences == 5 and out.samples == ref.samples
        # the same audio as without the overload (seeded); batching with other streams may move the
        # float rounding by a few PCM16 steps, never more
        got, want = np.frombuffer(out.data, "<i2").astype(int), np.frombuffer(ref.data, "<i2").astype(int)
        assert out.summary.speech_tokens == ref.summary.speech_tokens
        assert np.abs(got - want).max() <= 32, np.abs(got - want).max()
    pair.assert_idle()
    assert pair.token.stats()["refused_streams"] == 6
    assert run(synthesize(target, "Room again.", timeout=60)).code == "OK"
    pair.assert_idle()


def test_vocoder_limit_reaches_the_client_as_resource_exhausted(real_pair):
    pair = real_pair(token_cfg={"max_streams": 4}, vocoder_cfg={"max_streams": 1})
    target = pair.token.target

    async def scenario():
        (first,) = await start_streams(target, TEXT, (1,), gap=0.03)
        second = await asyncio.to_thread(sync_synthesize, target, "Me too.", timeout=10)
        return await first, second

    first, second = run(scenario(), timeout=90)
    assert first.code == "OK" and first.summary.sentences == 5, (first.code, first.details)
    assert second.code == "RESOURCE_EXHAUSTED", (second.code, second.details)
    assert "vocoder service" in second.details and "capacity" in second.details, second.details
    pair.assert_idle()
    assert run(synthesize(target, "Now it fits.", timeout=60)).code == "OK"
    pair.assert_idle()
