#!/usr/bin/env bash
# Build one of the service images with its base pinned by tag AND digest (deploy/docker/bases.env).
#
#   deploy/docker/build.sh cpu|token-trtllm|vocoder-tensorrt [IMAGE_NAME] [extra docker build args...]
#
# IMAGE_NAME defaults to chatterbox-serve/<target>:<version from pyproject.toml>.  The build context
# is the repository root.  A placeholder digest in bases.env stops the build unless ALLOW_UNPINNED=1
# (then the tag alone is used: fine for an experiment, never for a release).
# Not run in this repository's CI: it has no Docker engine (docs/DEPLOY.md, "Validated here").
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
target="${1:?usage: build.sh cpu|token-trtllm|vocoder-tensorrt [IMAGE_NAME] [docker build args...]}"
shift
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml" | head -1)"
image="${1:-chatterbox-serve/$target:$version}"
[ $# -gt 0 ] && shift
# shellcheck source=bases.env
source "$here/bases.env"

pinned() {  # pinned TAG DIGEST -> TAG@DIGEST, or TAG alone with ALLOW_UNPINNED=1
    local tag="$1" digest="$2"
    if [[ "$digest" == *PLACEHOLDER* || -z "$digest" ]]; then
        if [[ "${ALLOW_UNPINNED:-0}" != 1 ]]; then
            echo "bases.env: no digest for $tag yet; resolve it (docs/DEPLOY.md) or set ALLOW_UNPINNED=1" >&2
            exit 2
        fi
        echo "$tag"
    else
        echo "$tag@$digest"
    fi
}

case "$target" in
    cpu)              base="$(pinned "$CPU_BASE" "$CPU_BASE_DIGEST")" ;;
    token-trtllm)     base="$(pinned "$TRTLLM_BASE" "$TRTLLM_BASE_DIGEST")" ;;
    vocoder-tensorrt) base="$(pinned "$TENSORRT_BASE" "$TENSORRT_BASE_DIGEST")" ;;
    *) echo "unknown target $target (cpu, token-trtllm, vocoder-tensorrt)" >&2; exit 2 ;;
esac
build_base="$(pinned "$CPU_BASE" "$CPU_BASE_DIGEST")"

exec docker build -f "$here/$target.Dockerfile" \
    --build-arg "BASE_IMAGE=$base" --build-arg "BUILD_IMAGE=$build_base" \
    -t "$image" "$@" "$root"
