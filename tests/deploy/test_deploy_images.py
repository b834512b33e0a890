"""The Dockerfiles, their pinned bases and the image names the manifests use fit together.

No image is built here (no Docker engine on this machine or in CI; docs/DEPLOY.md): these checks
read the files.  They catch a base pinned in one place and not the other, a root user, an entry point
that is not a console script, a COPY of a file that does not exist, a manifest naming an image no
Dockerfile builds.
"""
from __future__ import annotations

import re
import tomllib

import pytest

from deploy_support import (
    DOCKER,
    OVERLAYS,
    ROOT,
    all_containers,
    bases_env,
    dockerfile_instructions,
    image_entrypoints,
    load_compose,
    pod_specs,
)

DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
BASE_KEYS = {"cpu": "CPU_BASE", "token-trtllm": "TRTLLM_BASE", "vocoder-tensorrt": "TENSORRT_BASE"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]


def _stem(path) -> str:
    return path.name.removesuffix(".Dockerfile")


def test_every_dockerfile_has_a_pinned_base():
    assert sorted(_stem(p) for p in DOCKERFILES) == sorted(BASE_KEYS)
    bases = bases_env()
    for key in BASE_KEYS.values():
        tag = bases[key]
        assert re.fullmatch(r"[\w./-]+:[\w.-]*\d[\w.-]*", tag) and not tag.endswith(":latest"), \
            f"{key}={tag} is not pinned to a versioned tag"
        assert bases[f"{key}_DIGEST"].startswith("sha256:"), f"{key}_DIGEST is not a sha256 digest (or placeholder)"
    build_sh = (DOCKER / "build.sh").read_text()
    for path in DOCKERFILES:
        args = {}
        for ins, rest in dockerfile_instructions(path):
            if ins == "ARG" and "=" in rest:
                k, _, v = rest.partition("=")
                args[k] = v
        assert args.get("BASE_IMAGE") == bases[BASE_KEYS[_stem(path)]], \
            f"{path.name}: default BASE_IMAGE differs from bases.env"
        if "BUILD_IMAGE" in args:
            assert args["BUILD_IMAGE"] == bases["CPU_BASE"]
        froms = [rest for ins, rest in dockerfile_instructions(path) if ins == "FROM"]
        assert all(f.split()[0] in ("${BASE_IMAGE}", "${BUILD_IMAGE}") for f in froms), \
            f"{path.name}: a FROM bypasses the pinned base arguments: {froms}"
        assert re.search(rf"^\s*{re.escape(_stem(path))}\)", build_sh, re.M), f"build.sh cannot build {_stem(path)}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=_stem)
def test_image_runs_non_root_a_console_script_and_copies_real_files(path):
    ins = dockerfile_instructions(path)
    final = ins[max(i for i, (k, _) in enumerate(ins) if k == "FROM"):]
    users = [rest for k, rest in final if k == "USER"]
    assert users, f"{path.name}: final stage runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{path.name}: USER {users[-1]} (numeric, non-zero: runAsNonRoot checks it)"
    argv = image_entrypoints()[_stem(path)]
    assert argv and argv[0] in PYPROJECT["project"]["scripts"], f"{path.name}: runs {argv}, not a console script"
    ignored = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert {".venv", ".git"} <= set(ignored)
    for k, rest in ins:
        if k == "COPY" and not rest.startswith("--from"):
            *sources, _dest = rest.split()
            for src in sources:
                assert (ROOT / src).exists(), f"{path.name}: COPY {src}: no such file in the repository"
                assert src.rstrip("/") not in ignored, f"{path.name}: COPY {src} but .dockerignore drops it"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_name_images_our_dockerfiles_build(rendered, overlay):
    stems = {_stem(p) for p in DOCKERFILES}
    for where, pod in pod_specs(rendered[overlay]):
        for c in all_containers(pod):
            image = c["image"]
            if image.startswith("otel/"):
                assert image == load_compose()["services"]["otel-collector"]["image"], \
                    f"{overlay}: collector {image} differs from compose's"
                assert re.fullmatch(r"otel/opentelemetry-collector-contrib:\d+\.\d+\.\d+", image), image
                continue
            m = re.fullmatch(r"chatterbox-serve/([\w-]+):([\w.]+)", image)
            assert m, f"{overlay} {where}/{c['name']}: image {image} is not one of ours"
            assert m.group(1) in stems, f"{overlay} {where}: no deploy/docker/{m.group(1)}.Dockerfile"
            assert m.group(2) == VERSION, f"{overlay} {where}: tag {m.group(2)} != project version {VERSION}"


def test_compose_images_match_the_project_version():
    for name, svc in load_compose()["services"].items():
        m = re.fullmatch(r"chatterbox-serve/([\w-]+):([\w.]+)", svc["image"])
        if m:
            assert m.group(2) == VERSION, f"compose {name}: tag {m.group(2)} != {VERSION}"
