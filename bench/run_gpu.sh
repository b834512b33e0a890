#!/usr/bin/env bash
# The one GPU command (issue 6): run on the device machine from the repo root, e.g. through the
# device tool with carry=[".whl", "tts_api"]:
#     bash bench/run_gpu.sh [gpu_bench.py args]
# .whl/ comes from bench/fetch_wheels.sh; tts_api/ from `make protos` (the GPU image has no
# grpcio-tools).  Results: $OUT/perf.json, $OUT/PERF.md, $OUT/bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 bench/gpu_bench.py --out "$OUT" "$@" 2>&1 | grep --line-buffered -v -E "it/s\]|s/it\]|Inference\.\.\.$" | tee "$OUT/bench.log"
