# Token service on GPU: NVIDIA's TensorRT-LLM release image + our wheel (TTS_ENGINE=trtllm).
# The same image runs the T3 export Job (`tts-export` + `trtllm-build`), so the engine is always
# built by the TensorRT-LLM version that loads it.
#
#   deploy/docker/build.sh token-trtllm   (reads the pinned bases from deploy/docker/bases.env)
#
# BASE_IMAGE / BUILD_IMAGE are "tag@sha256:digest" (build.sh passes them); the defaults below are the
# tags alone, for local experiments only.  Build context: the repository root.
ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.1
ARG BUILD_IMAGE=python:3.11-slim-bookworm

# ---- build: generated gRPC code (tts_api/, git-ignored) + one pure-Python wheel ----------------------
FROM ${BUILD_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY constraints-cpu.txt pyproject.toml README.md ./
COPY protos/ protos/
RUN python -m venv /opt/tools \
 && /opt/tools/bin/pip install grpcio-tools build \
 && mkdir -p tts_api \
 && /opt/tools/bin/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. \
        $(find protos -name '*.proto') \
 && find tts_api -type d -exec touch {}/__init__.py \;
COPY token_service/ token_service/
COPY vocoder_service/ vocoder_service/
COPY tts_common/ tts_common/
COPY tts_client/ tts_client/
COPY export/ export/
RUN /opt/tools/bin/python -m build --wheel --outdir /wheels .

# ---- runtime ---------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
# pip settings for the build only (ARG: not kept in the image's environment)
ARG PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
COPY --from=build /wheels /tmp/wheels
# Every package the base image ships (torch, tensorrt_llm, numpy, ...) is held at its version: our
# wheel only adds what is missing (grpc, OpenTelemetry, tokenizers, ...).  A conflict fails the build.
RUN python3 -m pip list --format=freeze > /tmp/base-constraints.txt \
 && python3 -m pip install -c /tmp/base-constraints.txt "$(echo /tmp/wheels/*.whl)[export]" \
 && rm -rf /tmp/wheels /tmp/base-constraints.txt \
 && groupadd --gid 10001 tts \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin tts \
 && mkdir -p /models /engines && chown 10001:10001 /models /engines

# Read-only root filesystem at run time: nothing may be written outside /tmp (an emptyDir / tmpfs).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/torchinductor \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    CUDA_CACHE_PATH=/tmp/.cache/nv
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051
ENTRYPOINT ["tts-token-service"]
