"""The export pipeline: model folder → everything the GPU machine needs to build both engines.

``full_export_pipeline(model_dir, voice, output_dir)`` writes::

    output_dir/
      voice_prefix/<voice>.safetensors + .json   the baked voice's prefix and metadata
      trtllm/                                    TensorRT-LLM checkpoint (config.json, rank0.safetensors),
                                                 prompt_table.npz (+ prompt_tables/<voice>.npz for every voice),
                                                 embedding_bias.npy, t3_trtllm.json, build_engine.sh
      vocoder/                                   ONNX graphs + TensorRT build scripts (export.s3gen_onnx)
      export_report.json                         every path written and the validation results

and returns the same paths. The T3 side is validated with :mod:`export.validate` (independent
loader vs the T3 engine) unless ``validate=False``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from export.t3_for_trt import convert_checkpoint, create_t3_for_trt
from export.trtllm_checkpoint import BuildLimits, write_trtllm_checkpoint
from export.voice_prefix import compute_voice_prefix, extract_and_save_voice_prefix, load_t3_state_dict


def list_voice_names(model_dir: str | Path, voices_dir: str | Path | None = None) -> list[str]:
    """``default`` (if ``conds.pt`` exists) and every ``<voices_dir>/<name>.pt``."""
    d = Path(model_dir)
    names = ["default"] if (d / "conds.pt").is_file() else []
    vdir = Path(voices_dir) if voices_dir else d / "voices"
    if vdir.is_dir():
        names += sorted(p.stem for p in vdir.glob("*.pt") if p.stem != "default")
    return names


def export_trtllm(model_dir: str | Path, voice: str, output_dir: str | Path, limits: BuildLimits | None = None,
                  all_voices: bool = True, voices_dir: str | Path | None = None) -> dict[str, Path]:
    """T3 → TensorRT-LLM checkpoint with ``voice`` baked as prompt id 0 (+ a table per voice)."""
    t3_sd, cfg = load_t3_state_dict(model_dir)
    names = list_voice_names(model_dir, voices_dir) if all_voices else [voice]
    if voice not in names:
        raise ValueError(f"voice {voice!r} not found in {model_dir} (voices: {names})")
    prefixes = {n: compute_voice_prefix(t3_sd, model_dir, n, cfg, voices_dir) for n in names}
    model = create_t3_for_trt(t3_sd, prefixes[voice], cfg)
    return write_trtllm_checkpoint(model, output_dir, prefixes, baked_voice=voice, limits=limits,
                                   source={"source_model_dir": str(Path(model_dir).resolve()), "voice": voice})


def full_export_pipeline(model_dir: str | Path, voice: str, output_dir: str | Path, *,
                         limits: BuildLimits | None = None, vocoder: bool = True, validate: bool = True,
                         save_t3_for_trt: bool = False, vocoder_preset: str | None = None) -> dict[str, object]:
    """Run every export step; returns ``{"paths": {...}, "validation": [...], "seconds": {...}}``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    meta = extract_and_save_voice_prefix(model_dir, voice, out / "voice_prefix" / f"{voice}.safetensors")
    paths["voice_prefix"], paths["voice_prefix_meta"] = meta["path"], meta["metadata_path"]
    seconds["voice_prefix"] = time.perf_counter() - t0

    if save_t3_for_trt:
        t0 = time.perf_counter()
        paths["t3_for_trt"] = str(convert_checkpoint(model_dir, out / "t3_for_trt", voice))
        seconds["t3_for_trt"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for k, p in export_trtllm(model_dir, voice, out / "trtllm", limits).items():
        paths[f"trtllm.{k}"] = str(p)
    seconds["trtllm"] = time.perf_counter() - t0

    validation = []
    if validate:
        from export.validate import print_validation_report, run_all_tests

        t0 = time.perf_counter()
        results = run_all_tests(out / "trtllm", out / "trtllm" / "prompt_table.npz", model_dir, voice)
        print_validation_report(results)
        validation = [{"name": r.name, "passed": r.passed, "detail": r.detail} for r in results]
        seconds["validate_trtllm"] = time.perf_counter() - t0

    if vocoder:
        from export.s3gen_onnx import export_vocoder

        t0 = time.perf_counter()
        voc = export_vocoder(model_dir, out / "vocoder", voice=voice, preset=vocoder_preset, check=validate)
        for k, p in voc["paths"].items():
            paths[f"vocoder.{k}"] = str(p)
        validation += voc.get("validation", [])
        seconds["vocoder"] = time.perf_counter() - t0

    report = {"model_dir": str(Path(model_dir).resolve()), "voice": voice, "paths": paths,
              "validation": validation, "seconds": seconds,
              "ok": all(v["passed"] for v in validation)}
    (out / "export_report.json").write_text(json.dumps(report, indent=2))
    report["paths"]["report"] = str(out / "export_report.json")
    return report


# ---------------------------------------------------------------------- CLI
def _limits_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="engine dtype")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-text-tokens", type=int, default=400)
    p.add_argument("--max-new-tokens", type=int, default=1001)
    p.add_argument("--max-num-tokens", type=int, default=8192)


def _limits(a: argparse.Namespace) -> BuildLimits:
    return BuildLimits(max_batch_size=a.max_batch_size, max_text_tokens=a.max_text_tokens,
                       max_new_tokens=a.max_new_tokens, dtype=a.dtype, max_num_tokens=a.max_num_tokens)


def _print_paths(paths: dict) -> None:
    for k, v in paths.items():
        print(f"{k}\t{v}")


def _cmd_trtllm(a: argparse.Namespace) -> int:
    paths = export_trtllm(a.model_dir, a.voice, a.output_dir, _limits(a))
    _print_paths({k: str(v) for k, v in paths.items()})
    if a.validate:
        from export.validate import print_validation_report, run_all_tests
        return 0 if print_validation_report(run_all_tests(a.output_dir, None, a.model_dir, a.voice)) else 1
    return 0


def _cmd_voice_prefix(a: argparse.Namespace) -> int:
    meta = extract_and_save_voice_prefix(a.model_dir, a.voice, a.output)
    _print_paths({"voice_prefix": meta["path"], "metadata": meta["metadata_path"]})
    return 0


def _cmd_all(a: argparse.Namespace) -> int:
    report = full_export_pipeline(a.model_dir, a.voice, a.output_dir, limits=_limits(a), vocoder=not a.no_vocoder,
                                  validate=not a.no_validate, save_t3_for_trt=a.save_t3_for_trt)
    _print_paths(report["paths"])
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
    return 0 if report["ok"] else 1


def register(subparsers) -> None:
    """``tts-export trtllm | voice-prefix | all``."""
    p = subparsers.add_parser("trtllm", help="T3 → TensorRT-LLM checkpoint + prompt tables + build_engine.sh")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--voice", default="default", help="voice baked as prompt id 0")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--validate", action="store_true", help="run export.validate on the result")
    _limits_args(p)
    p.set_defaults(func=_cmd_trtllm)

    p = subparsers.add_parser("voice-prefix", help="a voice → prefix embeddings (.safetensors) + metadata (.json)")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--voice", default="default")
    p.add_argument("--output", required=True, help="output .safetensors path")
    p.set_defaults(func=_cmd_voice_prefix)

    p = subparsers.add_parser("all", help="full export: TensorRT-LLM side + vocoder ONNX/TensorRT side, validated")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--voice", default="default")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--no-vocoder", action="store_true", help="skip the S3Gen ONNX / TensorRT part")
    p.add_argument("--no-validate", action="store_true")
    p.add_argument("--save-t3-for-trt", action="store_true", help="also write the T3ForTRT PyTorch checkpoint")
    _limits_args(p)
    p.set_defaults(func=_cmd_all)


__all__ = ["full_export_pipeline", "export_trtllm", "list_voice_names", "register"]
