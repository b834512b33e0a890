"""Helpers for the deploy tests: render kustomizations, read compose and Dockerfiles, resolve env.

Everything here is read-only over the repository's ``deploy/`` tree; the tests decide what to assert.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
COMPOSE_FILE = DEPLOY / "compose" / "compose.yaml"
DOCKER = DEPLOY / "docker"

# Kubernetes versions whose schemas (shipped inside the kubernetes-validate package, so offline) every
# rendered document must pass: the oldest we support (native gRPC probes are GA since 1.27; 1.28 is
# the floor docs/DEPLOY.md states) and a current one.
K8S_VERSIONS = ("1.28.0", "1.33.0")

TOKEN_DEPLOYMENT, TOKEN_CONTAINER = "tts-token-service", "token-service"
VOCODER_DEPLOYMENT, VOCODER_CONTAINER = "tts-vocoder-service", "vocoder-service"
VOCODER_HEADLESS = "tts-vocoder-headless"


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(path: Path) -> list[dict]:
    """``kubectl kustomize path`` as a list of documents (raises with kustomize's message on error)."""
    exe = kubectl()
    assert exe is not None
    proc = subprocess.run([exe, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def find(docs: Iterable[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: Iterable[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def container(pod_spec: dict, name: str) -> dict:
    found = [c for c in pod_spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"no container {name!r} in {[c['name'] for c in pod_spec['containers']]}"
    return found[0]


def all_containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec["containers"])


def pod_specs(docs: Iterable[dict]) -> Iterator[tuple[str, dict]]:
    """``("Kind/name", pod spec)`` of every workload."""
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]


def selects(selector: dict, labels: dict) -> bool:
    """A ``matchLabels`` selector (the only form these manifests use) against pod labels."""
    assert set(selector) <= {"matchLabels"}, f"unsupported selector {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def container_env(docs: list[dict], c: dict) -> dict[str, str]:
    """The environment a container starts with: ``envFrom`` ConfigMaps, then ``env`` (values with
    ``valueFrom`` become ``"<valueFrom>"`` and references to them stay ``$(VAR)``; other ``$(VAR)``
    references are expanded like the kubelet does)."""
    env: dict[str, str] = {}
    from_fields: set[str] = set()
    for src in c.get("envFrom", []):
        assert set(src) == {"configMapRef"}, f"unexpected envFrom source {src}"
        env.update(one(docs, "ConfigMap", src["configMapRef"]["name"]).get("data", {}))
    for e in c.get("env", []):
        if "valueFrom" in e:  # known only in the pod: references to it stay $(NAME)
            env[e["name"]] = "<valueFrom>"
            from_fields.add(e["name"])
        else:
            env[e["name"]] = re.sub(
                r"\$\((\w+)\)",
                lambda m: env[m.group(1)] if m.group(1) in env and m.group(1) not in from_fields else m.group(0),
                e.get("value", ""))
    return env


def port_of(listen: str) -> int:
    """``host:port`` (or ``[::]:port``) -> port."""
    return int(listen.rsplit(":", 1)[1])


def named_port(c: dict, name: str) -> int:
    ports = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == name]
    assert len(ports) == 1, f"container {c['name']} has no single port named {name!r}"
    return ports[0]


def command_lines(command: list[str]) -> list[list[str]]:
    """The simple commands a container runs: the argv itself, or each command of an ``sh -c`` script
    (split at ``&&``, ``||``, ``;`` and newlines; leading ``VAR=value`` assignments dropped)."""
    if len(command) >= 3 and command[0] in ("sh", "bash", "/bin/sh") and command[1] == "-c":
        lines = []
        for part in re.split(r"&&|\|\||;|\n", command[2]):
            words = shlex.split(part.replace("$$", "$"))
            while words and re.fullmatch(r"\w+=\S*", words[0]):
                words = words[1:]
            if words:
                lines.append(words)
        return lines
    return [list(command)] if command else []


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, rest)`` of a Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        word, _, rest = (buf + stripped).partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def bases_env() -> dict[str, str]:
    pairs = {}
    for line in (DOCKER / "bases.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition("=")
            pairs[k.strip()] = v.strip()
    return pairs


def image_entrypoints() -> dict[str, list[str]]:
    """``{dockerfile stem: ENTRYPOINT or CMD argv}`` of the final stage of each Dockerfile."""
    import json

    out = {}
    for path in sorted(DOCKER.glob("*.Dockerfile")):
        argv: list[str] = []
        for ins, rest in dockerfile_instructions(path):
            if ins == "FROM":
                argv = []
            elif ins in ("ENTRYPOINT", "CMD") and not argv:
                argv = json.loads(rest)
        out[path.name.removesuffix(".Dockerfile")] = argv
    return out


def walk(obj: Any) -> Iterator[Any]:
    """Every value nested in ``obj`` (dicts and lists), depth first."""
    yield obj
    if isinstance(obj, dict):
        for v in obj.values():
            yield from walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk(v)
