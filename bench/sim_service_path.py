"""The service path under message load on CPU: token and vocoder services in their own processes.

    python bench/sim_service_path.py

Fake engines: T3 yields 1 token every 2 ms per stream (tests/integration/fakes.py); the vocoder
follows the real chunk schedule with a sleep-based step cost (bench/sim_vocoder_engine.py). Prints
client TTFA at 8 and 32 streams with ``hold_pushes`` on / off and token gathering
(``vocoder_min_tokens`` 8, ``vocoder_max_wait_ms`` 4) on / off. CPU only: message and scheduling
costs, not GPU contention.
"""
import asyncio, multiprocessing as mp, statistics, sys, time, concurrent.futures as cf
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "integration"), str(ROOT / "bench")]

def run_vocoder(q, hold):
    import sim_vocoder_engine as sim
    from harness import MemoryTelemetry
    from tts_common.config import load_config
    from vocoder_service.config import VocoderServiceConfig
    from vocoder_service.server import start_server
    from vocoder_service.engine import VocoderEngine
    async def main():
        eng = VocoderEngine(lambda v, s: sim.Fake(), ["default"], step_batch=sim.push_batch,
                            finish_batch=sim.finish_batch, hold_pushes=hold)
        cfg = load_config(VocoderServiceConfig, [], {}, listen="127.0.0.1:0", model_dir="unused", max_streams=512)
        server, _ = await start_server(cfg, eng, MemoryTelemetry("v").telemetry)
        q.put(server.port); await asyncio.sleep(3600)
    asyncio.run(main())

def run_token(q, vport, extra):
    from fakes import FakeTokenEngine, FakeSampling
    from harness import MemoryTelemetry
    from tts_common.config import load_config
    from token_service.config import TokenServiceConfig
    from token_service.server import start_server
    async def main():
        cfg = load_config(TokenServiceConfig, [], {}, listen="127.0.0.1:0", model_dir="unused", max_streams=512,
                          vocoder_target=f"127.0.0.1:{vport}", **extra)
        server, _ = await start_server(cfg, FakeTokenEngine(chunk=1, step_delay=0.002, slots=512), MemoryTelemetry("t").telemetry,
                                       make_sampling=FakeSampling)
        q.put(server.port); await asyncio.sleep(3600)
    asyncio.run(main())

def one(port, i):
    import grpc
    from tts_client.client import make_config, synthesize
    time.sleep((i % 16) * 0.05)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        r = synthesize(ch, "Hello there, this is a test of the streaming path under load, forty words.", make_config(encoding="pcm16", seed=i))
    return r.first_audio_seconds

def trial(hold, extra, M):
    q = mp.Queue()
    pv = mp.Process(target=run_vocoder, args=(q, hold), daemon=True); pv.start(); vport = q.get(timeout=60)
    pt = mp.Process(target=run_token, args=(q, vport, extra), daemon=True); pt.start(); tport = q.get(timeout=60)
    one(tport, 0)
    with cf.ThreadPoolExecutor(M) as ex:
        firsts = list(ex.map(lambda i: one(tport, i), range(M * 2)))
    pv.kill(); pt.kill()
    return 1000 * statistics.median(firsts), 1000 * max(firsts)

if __name__ == "__main__":
    for M in (8, 32):
        for hold in (False, True):
            for extra in ({}, {"vocoder_min_tokens": 8, "vocoder_max_wait_ms": 4}):
                p50, mx = trial(hold, extra, M)
                print(f"streams {M:3d} hold={hold!s:5} gather={'8/4ms' if extra else 'off  '}: TTFA p50 {p50:6.0f} ms max {mx:6.0f} ms", flush=True)
