"""TensorRT engines for the vocoder graphs: optimisation profiles, precision, builder, trtexec scripts.

Profiles come from the streaming session's shapes (``vocoder_service.s3gen.streaming``): one step
runs the flow on ``prompt + context (≤ context_tokens) + chunk + look-ahead`` tokens and HiFT on
``hift_context_frames + held-back + 2·chunk`` frames; ``finish()`` may run any smaller size. So
for each graph: ``min`` = the smallest legal call, ``opt`` = the steady-state chunk at the middle
batch size, ``max`` = the largest chunk (first or later, with look-ahead) at the largest batch.

Precision: ``flow_encoder`` and ``flow_estimator`` build in fp16 with the numerically sensitive
layers (normalisations, softmax, exp/pow/sqrt, reductions, division) pinned to fp32
(``OBEY_PRECISION_CONSTRAINTS``); the HiFT graphs build in fp32 (the source phase and the iSTFT
magnitudes ``exp(·)`` up to 100 lose too much in fp16 — upstream's CosyVoice runtime keeps HiFT in
fp32 for the same reason).

:func:`build_engine` uses TensorRT's Python API (``tensorrt`` is imported inside it, so this
module loads without TensorRT); ``build_engines.sh`` runs the equivalent ``trtexec`` commands.
Neither is run here (no GPU / TensorRT on the export machine): see docs/EXPORT.md.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

# ONNX op types whose layers stay fp32 inside an fp16 engine
FP32_OPS = {"LayerNormalization", "ReduceMean", "ReduceSum", "Softmax", "Exp", "Pow", "Sqrt", "Div", "Sin", "Cos",
            "Erf", "Log", "Tanh", "CumSum"}
FP16_GRAPHS = {"flow_encoder", "flow_estimator"}


@dataclass(frozen=True)
class Profile:
    """Per input name: (min, opt, max) shapes."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def trtexec_flags(self) -> list[str]:
        def fmt(i: int) -> str:
            return ",".join(f"{n}:{'x'.join(map(str, s[i]))}" for n, s in self.shapes.items())
        return [f"--minShapes={fmt(0)}", f"--optShapes={fmt(1)}", f"--maxShapes={fmt(2)}"]


def streaming_profiles(cfg, prompt_tokens: int, stream=None, batch_sizes: tuple[int, ...] = (1, 4, 16),
                       chunk_tokens: tuple[int, ...] | None = None) -> dict[str, Profile]:
    """Profiles for the four graphs from an ``S3GenConfig``, the voice prompt length and a ``StreamConfig``."""
    if stream is None:
        from vocoder_service.s3gen.streaming import StreamConfig
        stream = StreamConfig()
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_sizes}")
    chunks = tuple(chunk_tokens or (stream.first_chunk_tokens, stream.chunk_tokens))
    la, r, hop, m = cfg.pre_lookahead, cfg.token_mel_ratio, cfg.hop_samples, cfg.n_mels
    b_min, b_opt, b_max = min(batch_sizes), sorted(batch_sizes)[len(batch_sizes) // 2], max(batch_sizes)
    steady, biggest = stream.chunk_tokens, max(chunks)
    n_min = prompt_tokens + 1
    n_opt = prompt_tokens + stream.context_tokens + steady + la
    n_max = prompt_tokens + stream.context_tokens + biggest + la
    f_min, f_opt, f_max = r * n_min, r * (n_opt - la), r * n_max
    h_min = 1
    h_opt = stream.hift_context_frames + stream.holdback_frames + r * steady
    h_max = stream.hift_context_frames + stream.holdback_frames + r * (biggest + la)

    def est(b, f):
        return {"x": (b, m, f), "mask": (b, 1, f), "mu": (b, m, f), "t": (b,), "r": (b,), "spk": (b, m),
                "cond": (b, m, f)}

    def prof(make) -> Profile:
        lo, mid, hi = make(b_min, 0), make(b_opt, 1), make(b_max, 2)
        return Profile({k: (lo[k], mid[k], hi[k]) for k in lo})

    return {
        "flow_encoder": prof(lambda b, i: {"tokens": (b, (n_min, n_opt, n_max)[i])}),
        "flow_estimator": prof(lambda b, i: est(b, (f_min, f_opt, f_max)[i])),
        "hift_f0": prof(lambda b, i: {"mel": (b, m, (h_min, h_opt, h_max)[i])}),
        "hift_decoder": prof(lambda b, i: {"mel": (b, m, (h_min, h_opt, h_max)[i]),
                                           "source": (b, 1, hop * (h_min, h_opt, h_max)[i])}),
    }


def fp32_layer_names(onnx_path: str | Path) -> list[str]:
    """Names of the ONNX nodes (= TensorRT layer names) whose op type is in :data:`FP32_OPS`."""
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    return [n.name for n in g.node if n.op_type in FP32_OPS and n.name]


def build_engine(onnx_path: str | Path, engine_path: str | Path, profile: Profile, fp16: bool = True,
                 fp32_layers: list[str] | None = None, workspace_gib: float = 4.0, trt=None) -> Path:
    """Build and serialise a TensorRT engine (TensorRT ≥ 8.6 Python API; ``trt`` injectable for tests)."""
    if trt is None:
        import tensorrt as trt  # type: ignore[no-redef]
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # implicit in TensorRT 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        keep = set(fp32_layers or [])
        if keep:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            for i in range(network.num_layers):
                layer = network.get_layer(i)
                if layer.name in keep:
                    layer.precision = trt.float32
                    for j in range(layer.num_outputs):
                        layer.set_output_type(j, trt.float32)
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.shapes.items():
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(blob))
    return engine_path


def trtexec_command(name: str, onnx_dir: str, engine_dir: str, profile: Profile, fp32_layers: list[str]) -> str:
    """The ``trtexec`` line equivalent to :func:`build_engine` for graph ``name``."""
    args = ["trtexec", f"--onnx={onnx_dir}/{name}.onnx", f"--saveEngine={engine_dir}/{name}.plan",
            *profile.trtexec_flags(), "--memPoolSize=workspace:4096"]
    if name in FP16_GRAPHS:
        args.append("--fp16")
        if fp32_layers:
            args += ["--precisionConstraints=obey",
                     "--layerPrecisions=" + ",".join(f"{n}:fp32" for n in fp32_layers),
                     "--layerOutputTypes=" + ",".join(f"{n}:fp32" for n in fp32_layers)]
    return " ".join(shlex.quote(a) if not a.startswith("--onnx=") and not a.startswith("--saveEngine=") else a
                    for a in args)


def write_tensorrt_scripts(onnx_dir: str | Path, cfg, prompt_tokens: int, stream=None,
                           batch_sizes: tuple[int, ...] = (1, 4, 16),
                           chunk_tokens: tuple[int, ...] | None = None) -> dict[str, Path]:
    """Write ``tensorrt_profiles.json``, ``build_engines.sh`` (trtexec) and ``build_engines.py`` next to the ONNX files."""
    d = Path(onnx_dir)
    profiles = streaming_profiles(cfg, prompt_tokens, stream, batch_sizes, chunk_tokens)
    fp32 = {n: (fp32_layer_names(d / f"{n}.onnx") if n in FP16_GRAPHS and (d / f"{n}.onnx").is_file() else [])
            for n in profiles}
    spec = {n: {"shapes": {k: list(map(list, v)) for k, v in p.shapes.items()}, "fp16": n in FP16_GRAPHS,
                "fp32_layers": fp32[n]} for n, p in profiles.items()}
    paths = {"profiles": d / "tensorrt_profiles.json"}
    paths["profiles"].write_text(json.dumps({"prompt_tokens": prompt_tokens, "batch_sizes": list(batch_sizes),
                                             "graphs": spec}, indent=2))
    lines = ["#!/usr/bin/env bash",
             "# Build the vocoder TensorRT engines with trtexec (generated by `tts-export onnx`).",
             "# Run inside NVIDIA's TensorRT container (nvcr.io/nvidia/tensorrt), on the serving GPU.",
             "set -euo pipefail",
             'ONNX_DIR="${ONNX_DIR:-$(cd "$(dirname "$0")" && pwd)}"',
             'ENGINE_DIR="${ENGINE_DIR:-$ONNX_DIR/engines}"',
             'mkdir -p "$ENGINE_DIR"']
    for n, p in profiles.items():
        lines.append(trtexec_command(n, '"$ONNX_DIR"', '"$ENGINE_DIR"', p, fp32[n]))
    lines.append('cp "$ONNX_DIR/vocoder_onnx.json" "$ONNX_DIR/tensorrt_profiles.json" "$ENGINE_DIR/"')
    paths["trtexec_script"] = d / "build_engines.sh"
    paths["trtexec_script"].write_text("\n".join(lines) + "\n")
    paths["trtexec_script"].chmod(0o755)
    paths["python_script"] = d / "build_engines.py"
    paths["python_script"].write_text(
        '"""Build the vocoder TensorRT engines with the Python API (same as build_engines.sh)."""\n'
        "import sys\nfrom pathlib import Path\n\n"
        "from export.tensorrt_build import build_all_engines\n\n"
        "onnx_dir = Path(__file__).resolve().parent\n"
        "engine_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else onnx_dir / 'engines'\n"
        "for name, path in build_all_engines(onnx_dir, engine_dir).items():\n"
        "    print(name, path)\n")
    return paths


def build_all_engines(onnx_dir: str | Path, engine_dir: str | Path, trt=None) -> dict[str, Path]:
    """Build every graph listed in ``tensorrt_profiles.json`` with :func:`build_engine`."""
    import shutil

    d, e = Path(onnx_dir), Path(engine_dir)
    spec = json.loads((d / "tensorrt_profiles.json").read_text())["graphs"]
    out = {}
    for name, s in spec.items():
        prof = Profile({k: tuple(tuple(x) for x in v) for k, v in s["shapes"].items()})
        out[name] = build_engine(d / f"{name}.onnx", e / f"{name}.plan", prof, fp16=s["fp16"],
                                 fp32_layers=s["fp32_layers"], trt=trt)
    for f in ("vocoder_onnx.json", "tensorrt_profiles.json"):
        if (d / f).is_file():
            shutil.copy(d / f, e / f)
    return out


def register(subparsers) -> None:
    """``tts-export tensorrt-scripts``: (re)write the profiles and build scripts for an ONNX folder."""
    p = subparsers.add_parser("tensorrt-scripts", help="TensorRT profiles + trtexec/Python build scripts for "
                                                        "an exported vocoder ONNX folder")
    p.add_argument("--onnx-dir", required=True)
    p.add_argument("--batch-sizes", default="1,4,16", help="comma-separated: min, (opt,) max batch")
    p.add_argument("--chunk-tokens", default=None, help="comma-separated chunk sizes (default: the stream config's)")
    p.set_defaults(func=_cmd)


def _cmd(a) -> int:
    from vocoder_service.s3gen.config import S3GenConfig

    meta = json.loads((Path(a.onnx_dir) / "vocoder_onnx.json").read_text())
    cfg = S3GenConfig()
    bs = tuple(int(x) for x in a.batch_sizes.split(","))
    ct = tuple(int(x) for x in a.chunk_tokens.split(",")) if a.chunk_tokens else None
    for k, p in write_tensorrt_scripts(a.onnx_dir, cfg, meta["prompt_tokens"], batch_sizes=bs, chunk_tokens=ct).items():
        print(f"{k}\t{p}")
    return 0


__all__ = ["Profile", "streaming_profiles", "fp32_layer_names", "build_engine", "build_all_engines",
           "trtexec_command", "write_tensorrt_scripts", "FP32_OPS", "FP16_GRAPHS", "register"]
