"""CPU count of what one vocoder streaming push runs OUTSIDE the CUDA graphs (no GPU needed).

    .venv/bin/python bench/count_vocoder_ops.py [--preset tiny|turbo] [--batch 1]

Runs the same tree's ``push_batch`` on CPU for (a) new sessions' first chunk (7 tokens: first
chunk 4 + look-ahead 3) and (b) one steady 25-token push, with ``model.graphs`` replaced by
stand-ins for the graphed callables of ``accel.S3GenGraphs`` (``flow``, ``flow_padded``,
``flow_noised``, ``flow_padded_noised``, ``f0``, ``f0_source``, ``decode``, as far as the tree has
them: what ``accel.CudaGraphCache`` captures). Inside a stand-in nothing is counted (on the GPU it is
one graph replay); outside, a ``TorchDispatchMode`` counts every aten op (each one an eager kernel
launch on the GPU, or host work for tensors built on the host), and patched ``Tensor.to`` /
``.cpu`` / ``.item`` / ``.tolist`` / ``.numpy``, ``torch.tensor`` and the factories given ``device=``,
and ``streaming._to_device`` (the one-buffer upload) record their call sites (on the GPU: a
host -> device copy when the source lives on the host, a host sync for device data). A stand-in
also counts what the real cache does around a replay: one ``copy_`` per input, one ``clone``
per output. Written to run in older trees too (missing attributes are skipped).

Also counted: a session's open (``StreamingSession(...)``, ``open_first`` / ``open_again``: the first
and a later session of a voice loaded on the host, as ``load_vocoder`` loads it). A ``.to(device)``
of host data counts as a fresh copy, as on a GPU; but a tree whose per-voice device cache skips
``.to`` when the data is already on the model's device makes no copy at all on CPU, where on a GPU
the voice's first open copies each voice tensor once.

Host vs device, on a CPU-only run: tensors are tagged "device" when they are the model's
parameters / buffers or the voice, come out of ``.to(device)`` or a factory call given an explicit
``device=``, or come out of an op with a device-tagged input; everything else is host data. So
"device ops" are what would launch a kernel on the GPU, "host ops" are CPU work on host tensors,
and a ``.to(device)`` of a host-tagged tensor is a host -> device copy (synchronous unless
``non_blocking`` from pinned memory).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _site() -> str:
    """The innermost caller frame in this repository's service code: 'file:line func'."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if ("vocoder_service" in name or "tts_common" in name) and "count_vocoder_ops" not in name:
            return f"{Path(name).name}:{f.f_lineno} {f.f_code.co_name}"
        f = f.f_back
    return "?"


class Counts(TorchDispatchMode):
    """aten ops outside the graph stand-ins, by op, by call site and host / device (see the docstring)."""

    def __init__(self):
        super().__init__()
        self.counting = False
        self.inside = 0
        self.device_tensors = WeakTensorKeyDictionary()
        self.explicit_device = 0  # > 0 inside a Python-level factory call given device=
        self.ops: Counter = Counter()
        self.sites: Counter = Counter()
        self.calls: Counter = Counter()  # transfer / sync call sites
        self.replays: Counter = Counter()
        self.host_ops = self.device_ops = 0

    def tag(self, t) -> None:
        if isinstance(t, torch.Tensor):
            self.device_tensors[t] = True

    def is_dev(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self.device_tensors

    def reset(self) -> None:
        self.ops, self.sites, self.calls, self.replays = Counter(), Counter(), Counter(), Counter()
        self.host_ops = self.device_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_dev = any(self.is_dev(t) for t in ins) or (not ins and self.explicit_device > 0)
        if on_dev:
            for t in pytree.tree_leaves(out):
                self.tag(t)
        if self.counting and not self.inside:
            name = str(func.overloadpacket).replace("aten.", "")
            self.ops[name] += 1
            self.sites[("dev " if on_dev else "host ") + _site()] += 1
            if on_dev:
                self.device_ops += 1
            else:
                self.host_ops += 1
        return out


MODE: Counts | None = None


class GraphStandIn:
    """Calls ``fn`` uncounted (one 'replay'); counts the cache's input copies / output clones."""

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name

    def __call__(self, *args, **consts):
        m = MODE
        if m is None or not m.counting:
            return self.fn(*args, **consts)
        m.replays[self.name] += 1
        m.ops["copy_ (graph inputs)"] += len(args)
        m.device_ops += len(args)
        for a in args:
            if not m.is_dev(a):
                m.calls[f"graph input from host (H2D) @ {_site()}"] += 1
        m.inside += 1
        try:
            out = self.fn(*args, **consts)
        finally:
            m.inside -= 1
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        for o in outs:
            m.tag(o)
        m.ops["clone (graph outputs)"] += len(outs)
        m.device_ops += len(outs)
        return out


class StandInGraphs:
    def __init__(self, model):
        self.flow = GraphStandIn(model.flow, "flow")
        for name in ("forward_padded", "forward_noised", "forward_padded_noised"):  # newer trees
            if hasattr(model.flow, name):
                attr = "flow_" + name[len("forward_"):]
                setattr(self, attr, GraphStandIn(getattr(model.flow, name), attr))
        self.f0 = GraphStandIn(model.mel2wav.f0_at_samples, "f0")
        if hasattr(model.mel2wav, "f0_source"):  # newer trees
            self.f0_source = GraphStandIn(model.mel2wav.f0_source, "f0_source")
        self.decode = GraphStandIn(model.mel2wav.decode, "decode")


def _has_device(a, k) -> bool:
    if k.get("device") is not None:
        return True
    return any(isinstance(x, (torch.device, str)) for x in a[1:]) or any(isinstance(x, torch.Tensor) for x in a[1:])


def _patch_calls() -> None:
    """Tag / record the transfer and sync entry points (outside the stand-ins)."""
    orig_to, orig_cpu = torch.Tensor.to, torch.Tensor.cpu

    def to(self, *a, **k):
        m = MODE
        if m is None or not _has_device((self, *a), k):
            return orig_to(self, *a, **k)
        src_dev = m.is_dev(self)
        out = orig_to(self, *a, **k)
        if m.counting and not m.inside and not src_dev:
            pinned = k.get("non_blocking", False) and self.is_pinned()
            m.calls[f"H2D {'non_blocking pinned' if pinned else 'sync'} .to @ {_site()}"] += 1
        m.tag(out)
        return out

    def cpu(self, *a, **k):
        m = MODE
        src_dev = m is not None and m.is_dev(self)
        out = orig_cpu(self, *a, **k)
        if m is not None and src_dev:
            if m.counting and not m.inside:
                m.calls[f"D2H sync .cpu() @ {_site()}"] += 1
            m.device_tensors.pop(out, None)  # on CPU ``cpu()`` returns the same object: it is host data now
        return out

    def reader(name):
        orig = getattr(torch.Tensor, name)

        def f(self, *a, **k):
            m = MODE
            if m is not None and m.counting and not m.inside and m.is_dev(self):
                m.calls[f"D2H sync .{name}() @ {_site()}"] += 1
            return orig(self, *a, **k)
        return f

    def factory(name):
        orig = getattr(torch, name)

        def f(*a, **k):
            m = MODE
            if m is None or k.get("device") is None:
                return orig(*a, **k)
            m.explicit_device += 1
            try:
                out = orig(*a, **k)
            finally:
                m.explicit_device -= 1
            m.tag(out)
            if name == "tensor" and m.counting and not m.inside:
                m.calls[f"H2D sync torch.tensor(device=) @ {_site()}"] += 1
            return out
        return f

    torch.Tensor.to, torch.Tensor.cpu = to, cpu
    from vocoder_service.s3gen import streaming
    upload = getattr(streaming, "_to_device", None)
    if upload is not None:  # the one-buffer upload: on CPU it returns host views; it is a device copy on a GPU
        def to_device(parts, dev):
            out = upload(parts, dev)
            m = MODE
            if m is not None:
                if m.counting and not m.inside:
                    m.calls[f"H2D non_blocking pinned (one buffer, {len(parts)} parts) @ {_site()}"] += 1
                for t in out:
                    m.tag(t)
            return out
        streaming._to_device = to_device
    for name in ("item", "tolist", "numpy"):
        setattr(torch.Tensor, name, reader(name))
    for name in ("tensor", "zeros", "ones", "empty", "full", "arange", "linspace", "zeros_like", "ones_like"):
        setattr(torch, name, factory(name))


def main() -> None:
    global MODE
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny", choices=["tiny", "turbo"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=0, help="prompt tokens (0: 20 tiny, 250 turbo)")
    ap.add_argument("--json", default="")
    ap.add_argument("--top", type=int, default=25, help="call sites listed")
    args = ap.parse_args()
    from vocoder_service.s3gen import streaming
    from vocoder_service.s3gen.config import S3GenConfig
    from vocoder_service.s3gen.model import S3GenModel, VoiceCond

    torch.manual_seed(0)
    model = S3GenModel(S3GenConfig.preset(args.preset)).eval()
    cfg = model.cfg
    tp = args.prompt or (20 if args.preset == "tiny" else 250)
    g = torch.Generator().manual_seed(0)
    voice = VoiceCond(prompt_token=torch.randint(0, cfg.vocab_size, (1, tp), generator=g),
                      prompt_feat=torch.randn(1, 2 * tp, cfg.n_mels, generator=g),
                      embedding=torch.randn(1, cfg.spk_dim, generator=g))
    model.graphs = StandInGraphs(model)
    _patch_calls()
    MODE = Counts()
    for t in list(model.parameters()) + list(model.buffers()) + [voice.prompt_token, voice.prompt_feat,
                                                                  voice.embedding]:
        MODE.tag(t)
    B = args.batch
    toks = torch.randint(0, cfg.vocab_size, (B, 200), generator=g).tolist()
    results = {}

    def measure(label, sessions, lists):
        m = MODE
        m.reset()
        m.counting = True
        with torch.inference_mode():
            outs = streaming.push_batch(sessions, lists)
        m.counting = False
        res = {"audio_samples": [int(o.numel()) for o in outs], "graph_replays": dict(m.replays),
               "eager_aten_ops": sum(m.ops.values()), "device_ops": m.device_ops, "host_ops": m.host_ops,
               "ops": dict(m.ops.most_common()), "by_site": dict(m.sites.most_common()),
               "transfers_and_syncs": dict(m.calls.most_common())}
        results[label] = res
        print(f"== {label} (batch {B}): {res['eager_aten_ops']} aten ops outside graphs = {m.device_ops} device "
              f"(kernel launches on a GPU) + {m.host_ops} host; graph replays {dict(m.replays)}; "
              f"audio {res['audio_samples']}")
        for k, v in m.calls.most_common():
            print(f"   {v:4d}  {k}")
        print("   top call sites of eager ops:")
        for k, v in m.sites.most_common(args.top):
            print(f"   {v:4d}  {k}")

    def measure_open() -> None:
        m = MODE
        host_voice = VoiceCond(*(t.clone() for t in (voice.prompt_token, voice.prompt_feat, voice.embedding)))
        for t in (host_voice.prompt_token, host_voice.prompt_feat, host_voice.embedding):
            m.device_tensors.pop(t, None)  # host data (a clone of device-tagged data is tagged)
        plain_to = torch.Tensor.to

        def fresh_to(self, *a, **k):  # on a GPU, .to(device) of host data is a new tensor every time
            host = not m.is_dev(self)
            out = plain_to(self, *a, **k)
            if out is self and host and _has_device((self, *a), k):
                m.device_tensors.pop(self, None)  # the host tensor stays host data
                m.inside += 1
                try:
                    out = self.detach().clone()
                finally:
                    m.inside -= 1
                m.tag(out)
            return out

        torch.Tensor.to = fresh_to
        try:
            for label in ("open_first", "open_again"):
                m.reset()
                m.counting = True
                streaming.StreamingSession(model, host_voice, seed=7).close()
                m.counting = False
                res = {"eager_aten_ops": sum(m.ops.values()), "device_ops": m.device_ops, "host_ops": m.host_ops,
                       "ops": dict(m.ops.most_common()), "transfers_and_syncs": dict(m.calls.most_common())}
                results[label] = res
                print(f"== {label} (a host-loaded voice's {'first' if label == 'open_first' else 'next'} session): "
                      f"{res['eager_aten_ops']} aten ops = {m.device_ops} device + {m.host_ops} host")
                for k, v in m.calls.most_common():
                    print(f"   {v:4d}  {k}")
        finally:
            torch.Tensor.to = plain_to

    with MODE:
        measure_open()
        sessions = [streaming.StreamingSession(model, voice, seed=i) for i in range(B)]
        measure("first_chunk", sessions, [t[:7] for t in toks])
        streaming.push_batch(sessions, [t[7:78] for t in toks])  # past the growing chunks: 75 committed
        measure("steady_25", sessions, [t[78:103] for t in toks])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
