"""deploy/compose/compose.yaml agrees with the services' real configuration (no Docker engine needed).

The same checks as the Kubernetes manifests get, on the compose file: setting names and values
through ``load_config``, ports, health-check service names, the vocoder target, drain vs stop grace,
export commands through the real ``tts-export`` parser.  (Not run here: ``docker compose config`` —
this machine has the docker CLI without the compose plugin and no engine; docs/DEPLOY.md.)
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from opentelemetry.sdk import environment_variables as otel_env

from deploy_support import COMPOSE_FILE, command_lines, image_entrypoints, load_compose, port_of
from token_service.config import TokenServiceConfig
from tts_api.v1 import token_service_pb2, vocoder_service_pb2
from tts_common.config import config_fields, load_config
from vocoder_service.config import VocoderServiceConfig

OTEL_NAMES = {v for k, v in vars(otel_env).items() if k.startswith("OTEL_") and isinstance(v, str)}
PROGRAMS = {
    "tts-token-service": (TokenServiceConfig, token_service_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name),
    "tts-vocoder-service": (VocoderServiceConfig,
                            vocoder_service_pb2.DESCRIPTOR.services_by_name["VocoderService"].full_name),
}


def _program(svc: dict) -> list[str]:
    """What the container runs: its command, else its image's ENTRYPOINT/CMD (from our Dockerfiles)."""
    if svc.get("command"):
        return command_lines(svc["command"])[0]
    m = re.fullmatch(r"chatterbox-serve/([\w-]+):[\w.]+", svc["image"])
    return image_entrypoints()[m.group(1)] if m else []


def _servers(compose: dict) -> dict[str, tuple[dict, str]]:
    """``{compose service: (definition, program)}`` for the token and vocoder services."""
    out = {}
    for name, svc in compose["services"].items():
        argv = _program(svc)
        if argv and argv[0] in PROGRAMS:
            out[name] = (svc, argv[0])
    return out


def _env(svc: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (svc.get("environment") or {}).items()}


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert m, f"unsupported duration {duration!r}"
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


def test_each_profile_runs_one_token_and_one_vocoder_service(compose):
    servers = _servers(compose)
    for profile in ("cpu", "gpu"):
        programs = sorted(p for name, (svc, p) in servers.items() if profile in svc.get("profiles", []))
        assert programs == ["tts-token-service", "tts-vocoder-service"], f"profile {profile}: {programs}"
    env_file = (COMPOSE_FILE.parent / ".env").read_text()
    assert re.search(r"^COMPOSE_PROFILES=cpu$", env_file, re.M), "the CPU pair must be the default profile"
    for name, svc in compose["services"].items():
        for dep in svc.get("depends_on", {}):
            assert dep in compose["services"], f"{name} depends on unknown service {dep}"
            assert set(compose["services"][dep].get("profiles", [])) <= set(svc.get("profiles", [])) or \
                not compose["services"][dep].get("profiles"), f"{name} depends on {dep} of another profile"


def test_settings_are_the_services_settings(compose):
    for name, (svc, program) in _servers(compose).items():
        cls, _ = PROGRAMS[program]
        env = _env(svc)
        envs = {f.env for f in config_fields(cls)}
        unknown = sorted(k for k in env if k not in envs | OTEL_NAMES)
        assert not unknown, f"compose {name}: not settings of {cls.__name__} nor OTEL_*: {unknown}"
        cfg = load_config(cls, [], env)  # raises ConfigError on a bad value or a missing setting
        assert svc["stop_grace_period"] and _seconds(svc["stop_grace_period"]) > cfg.drain_seconds, \
            f"compose {name}: stop_grace_period {svc['stop_grace_period']} <= drain {cfg.drain_seconds}s"
        assert env["OTEL_SERVICE_NAME"] == program


def test_ports_health_checks_and_vocoder_target(compose):
    servers = _servers(compose)
    for name, (svc, program) in servers.items():
        cls, health_name = PROGRAMS[program]
        port = port_of(load_config(cls, [], _env(svc)).listen)
        published = [str(p) for p in svc.get("ports", [])]
        if program == "tts-token-service":
            assert published == [f"{port}:{port}"], f"compose {name} publishes {published}"
        else:
            assert not published, f"compose {name}: the vocoder is internal, yet publishes {published}"
        check = " ".join(svc["healthcheck"]["test"])
        assert f"localhost:{port}" in check and f"service='{health_name}'" in check, f"compose {name}: {check}"
        if program == "tts-token-service":
            target = load_config(cls, [], _env(svc)).vocoder_target
            m = re.fullmatch(r"dns:///([\w-]+):(\d+)", target)
            assert m, f"compose {name}: TTS_VOCODER_TARGET {target!r} is not dns:///host:port"
            host, tport = m.group(1), int(m.group(2))
            vocoders = [(n, s) for n, (s, p) in servers.items() if p == "tts-vocoder-service"
                        and set(s.get("profiles", [])) == set(svc.get("profiles", []))]
            assert len(vocoders) == 1
            vname, vsvc = vocoders[0]
            nets = vsvc["networks"]
            aliases = {a for n in (nets.values() if isinstance(nets, dict) else []) for a in ((n or {}).get("aliases") or [])}
            assert host in {vname} | aliases, f"compose {name}: {host} is not the vocoder service {vname}"
            assert tport == port_of(load_config(VocoderServiceConfig, [], _env(vsvc)).listen)
            shared = set(nets) & set(svc["networks"])
            assert "backend" in shared and compose["networks"]["backend"].get("internal") is True


def test_containers_are_hardened(compose):
    for name, svc in compose["services"].items():
        if not svc["image"].startswith("chatterbox-serve/"):
            continue
        assert svc.get("user") == "10001:10001" and svc.get("read_only") is True, f"compose {name}"
        assert any(t.startswith("/tmp") for t in svc.get("tmpfs", [])), f"compose {name}: no writable /tmp"
        assert svc.get("cap_drop") == ["ALL"], f"compose {name}"


def test_telemetry_goes_to_the_collector(compose):
    col = compose["services"]["otel-collector"]
    (mount,) = col["volumes"]
    src = (COMPOSE_FILE.parent / mount.split(":")[0]).resolve()
    assert src.is_file(), f"collector config {src} missing"
    conf = yaml.safe_load(src.read_text())
    otlp_port = port_of(conf["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])
    for name, (svc, _) in _servers(compose).items():
        assert _env(svc)["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://otel-collector:{otlp_port}", f"compose {name}"
        assert set(col["networks"]) & set(svc["networks"]), f"compose {name} cannot reach the collector"


def test_export_commands_parse_with_the_real_cli(compose):
    from export.cli import build_parser

    parser = build_parser()
    seen = 0
    for name, svc in compose["services"].items():
        for argv in command_lines(svc.get("command") or []):
            if argv[0] == "tts-export":
                seen += 1
                try:
                    parser.parse_args(argv[1:])
                except SystemExit:
                    pytest.fail(f"compose {name}: `{' '.join(argv)}` is rejected by tts-export")
    assert seen >= 3


def test_bind_mounts_and_images_exist_in_the_repo(compose):
    stems = set(image_entrypoints())
    for name, svc in compose["services"].items():
        m = re.fullmatch(r"chatterbox-serve/([\w-]+):([\w.]+)", svc["image"])
        if m:
            assert m.group(1) in stems, f"compose {name}: no deploy/docker/{m.group(1)}.Dockerfile"
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("../"):
                assert (COMPOSE_FILE.parent / src).exists(), f"compose {name}: {src} missing"
    assert Path(COMPOSE_FILE).is_file()
