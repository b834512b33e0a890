"""The vocoder engine's scheduling on CPU: the real chunk schedule with a sleep-based step cost.

    python bench/sim_vocoder_engine.py

A stand-in backend follows S3Gen's streaming schedule (first chunk 4 tokens, doubling to 25, 3
look-ahead) and "computes" a batched step by sleeping BASE_MS + ROW_MS per row (the GIL is free,
as during a GPU step). Sessions start at random times in one second, receive tokens at a T3-like
rate and merge whatever is queued into each push (as the token service does). Prints the time
from the 7th token to the first audio, with and without ``hold_pushes``. A model of the engine,
not of the GPU: it isolates scheduling effects (bench/NOTES.md, runs 31-35).
"""
import asyncio, random, sys, time, statistics
import numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from vocoder_service.engine import VocoderEngine

BASE_MS, ROW_MS = 15.0, 2.0  # step cost: a graph replay + per-row

class Sched:
    def __init__(self):
        self.pending = 0; self.committed = 0; self.last = 0; self.done = False
    def next_chunk(self):
        return 4 if self.committed == 0 else min(25, self.last * 2)
    def ready(self):
        return self.pending >= self.next_chunk() + 3
    def step(self):
        n = self.next_chunk(); self.pending -= n; self.committed += n; self.last = n
        return n

class Fake:
    def __init__(self): self.s = Sched()
    def push(self, ids):  # unbatched
        return push_batch([self], [ids])[0]
    def finish(self):
        return finish_batch([self])[0]
    def close(self): pass
    def tokens_needed(self):
        return max(1, self.s.next_chunk() + 3 - self.s.pending)

def push_batch(backends, lists):
    for b, l in zip(backends, lists): b.s.pending += len(l)
    outs = [0] * len(backends)
    while True:
        ready = [i for i, b in enumerate(backends) if b.s.ready()]
        if not ready: break
        time.sleep((BASE_MS + ROW_MS * len(ready)) / 1000)
        for i in ready: outs[i] += backends[i].s.step()
    return [np.zeros(960 * n, np.float32) for n in outs]

def finish_batch(backends):
    time.sleep((BASE_MS + ROW_MS * len(backends)) / 1000)
    outs = []
    for b in backends:
        outs.append(np.zeros(960 * b.s.pending, np.float32)); b.s.pending = 0
    return outs

async def stream(engine, start, n_tokens, rate, res):
    await asyncio.sleep(start)
    q: asyncio.Queue = asyncio.Queue()
    async def produce():
        for k in range(n_tokens):
            await asyncio.sleep(1 / rate)
            q.put_nowait(k)
        q.put_nowait(None)
    prod = asyncio.ensure_future(produce())
    s = engine.open_session("default", seed=1)
    t0 = time.perf_counter() + 1 / rate * 7  # when the 7th token exists
    first = None
    done = False
    while not done:
        ids = [await q.get()]
        while not q.empty(): ids.append(q.get_nowait())  # the token service merges what is queued
        if ids[-1] is None: ids.pop(); done = True
        if ids:
            a = await s.push(ids)
            if a.size and first is None: first = time.perf_counter() - t0
    await s.finish(); s.close(); await prod
    res.append(first)

async def main(hold, n, rate):
    eng = VocoderEngine(lambda v, s: Fake(), ["default"], step_batch=push_batch, finish_batch=finish_batch, hold_pushes=hold)
    res = []
    rng = random.Random(0)
    await asyncio.gather(*(stream(eng, rng.random() * 1.0, 75, rate, res) for _ in range(n)))
    eng.shutdown()
    return res

if __name__ == '__main__':
  for n, rate in ((1, 600), (8, 500), (32, 200), (64, 120)):
    for hold in (False, True):
        r = asyncio.run(main(hold, n, rate))
        print(f"streams {n:3d} hold={hold!s:5}: first audio after the 7th token p50 {1000*statistics.median(r):6.1f} ms  max {1000*max(r):6.1f} ms")
