"""The rendered manifests agree with the services' real configuration and with each other.

Source of truth for names: ``token_service.config.TokenServiceConfig`` and
``vocoder_service.config.VocoderServiceConfig`` through ``tts_common.config.config_fields`` (env and
flag names, defaults) and ``load_config`` (values); the proto descriptors for health-check service
names; ``opentelemetry.sdk.environment_variables`` for ``OTEL_*`` names; the ``tts-export`` parser for
export commands.  A rename on either side fails here.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from urllib.parse import urlparse

import pytest
import yaml
from opentelemetry.sdk import environment_variables as otel_env

from deploy_support import (
    K8S,
    OVERLAYS,
    ROOT,
    TOKEN_CONTAINER,
    TOKEN_DEPLOYMENT,
    VOCODER_CONTAINER,
    VOCODER_DEPLOYMENT,
    VOCODER_HEADLESS,
    all_containers,
    command_lines,
    container,
    container_env,
    find,
    named_port,
    one,
    pod_specs,
    port_of,
    selects,
)
from token_service.config import TokenServiceConfig
from tts_common.config import config_fields, load_config
from vocoder_service.config import VocoderServiceConfig

# Standard OpenTelemetry SDK variables (the services read OTEL_* only through the SDK and
# tts_common.telemetry.Telemetry.from_env).
OTEL_NAMES = {v for k, v in vars(otel_env).items() if k.startswith("OTEL_") and isinstance(v, str)}
# Downward-API helpers the manifests use to build OTEL_RESOURCE_ATTRIBUTES.
HELPER_ENV = {"POD_NAME", "POD_NAMESPACE"}


@dataclass(frozen=True)
class Service:
    deployment: str
    container: str
    config: type
    script: str
    proto_module: str
    proto_service: str

    @property
    def health_name(self) -> str:
        """The full gRPC service name the server reports health for (from the generated descriptor)."""
        import importlib

        pb2 = importlib.import_module(self.proto_module)
        return pb2.DESCRIPTOR.services_by_name[self.proto_service].full_name


TOKEN = Service(TOKEN_DEPLOYMENT, TOKEN_CONTAINER, TokenServiceConfig, "tts-token-service",
                "tts_api.v1.token_service_pb2", "TokenService")
VOCODER = Service(VOCODER_DEPLOYMENT, VOCODER_CONTAINER, VocoderServiceConfig, "tts-vocoder-service",
                  "tts_api.v1.vocoder_service_pb2", "VocoderService")
SERVICES = (TOKEN, VOCODER)


def _pod(docs, svc: Service) -> dict:
    return one(docs, "Deployment", svc.deployment)["spec"]["template"]["spec"]


def _config(docs, svc: Service):
    """The service's config object exactly as the container would build it (args + env)."""
    c = container(_pod(docs, svc), svc.container)
    env = {k: v for k, v in container_env(docs, c).items()}
    return load_config(svc.config, c.get("args", []), env)


def _pyproject_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("svc", SERVICES, ids=lambda s: s.deployment)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_and_flags_are_the_services_settings(rendered, overlay, svc):
    docs = rendered[overlay]
    c = container(_pod(docs, svc), svc.container)
    assert c["command"] == [svc.script], f"{svc.deployment} runs {c['command']}"
    assert _pyproject_scripts()[svc.script].startswith(svc.script.removeprefix("tts-").replace("-", "_") + "."), \
        f"console script {svc.script} is not the service's entry point"
    fields = config_fields(svc.config)
    envs, flags = {f.env for f in fields}, {f.flag for f in fields}
    env = container_env(docs, c)
    unknown = sorted(k for k in env if k not in envs | OTEL_NAMES | HELPER_ENV)
    assert not unknown, f"{overlay} {svc.deployment}: not settings of {svc.config.__name__} nor OTEL_*: {unknown}"
    for arg in c.get("args", []):
        if arg.startswith("--"):
            assert arg.split("=")[0] in flags, f"{overlay} {svc.deployment}: unknown flag {arg}"
    required = [f.env for f in fields if f.required and f.env not in env]
    assert not required, f"{overlay} {svc.deployment}: required settings missing: {required}"
    # Values too: choices, numbers, engine/engine-dir combinations (raises ConfigError).
    _config(docs, svc)


@pytest.mark.parametrize("svc", SERVICES, ids=lambda s: s.deployment)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_probes(rendered, overlay, svc):
    docs = rendered[overlay]
    cfg = _config(docs, svc)
    port = port_of(cfg.listen)
    c = container(_pod(docs, svc), svc.container)
    assert named_port(c, "grpc") == port
    probes = {k: c.get(k) for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"] and probes["livenessProbe"], f"{svc.deployment} lacks probes"
    for kind, probe in probes.items():
        if probe is None:
            continue
        assert "grpc" in probe, f"{svc.deployment} {kind} is not a native gRPC probe"
        assert probe["grpc"]["port"] == port, f"{svc.deployment} {kind} probes port {probe['grpc']['port']}"
        assert probe["grpc"].get("service", "") in ("", svc.health_name), \
            f"{svc.deployment} {kind} asks for health of {probe['grpc'].get('service')!r}, not {svc.health_name!r}"
    # Readiness must follow the service itself (NOT_SERVING while draining).
    assert probes["readinessProbe"]["grpc"]["service"] == svc.health_name
    # Services route to the named port.
    services = [s for s in find(docs, "Service") if s["spec"].get("selector")
                and selects({"matchLabels": s["spec"]["selector"]}, _labels(docs, svc))]
    assert services, f"no Service selects {svc.deployment}"
    for s in services:
        for p in s["spec"]["ports"]:
            assert p["targetPort"] in ("grpc", port), f"Service {s['metadata']['name']} targets {p['targetPort']}"
            assert p["port"] == port


def _labels(docs, svc: Service) -> dict:
    return one(docs, "Deployment", svc.deployment)["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_token_service_reaches_every_vocoder_pod(rendered, overlay):
    """TTS_VOCODER_TARGET is dns:/// of the headless vocoder Service, in this namespace, on its port."""
    docs = rendered[overlay]
    target = _config(docs, TOKEN).vocoder_target
    m = re.fullmatch(r"dns:///([a-z0-9.-]+):(\d+)", target)
    assert m, f"TTS_VOCODER_TARGET {target!r} is not dns:///host:port (client-side balancing needs the resolver)"
    headless = one(docs, "Service", VOCODER_HEADLESS)
    ns = headless["metadata"]["namespace"]
    assert m.group(1) == f"{VOCODER_HEADLESS}.{ns}.svc.cluster.local"
    assert headless["spec"]["clusterIP"] == "None", "the vocoder Service must be headless (one address per pod)"
    assert selects({"matchLabels": headless["spec"]["selector"]}, _labels(docs, VOCODER))
    assert int(m.group(2)) == port_of(_config(docs, VOCODER).listen)
    assert not headless["spec"].get("publishNotReadyAddresses", False)


@pytest.mark.parametrize("svc", SERVICES, ids=lambda s: s.deployment)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_outlasts_drain(rendered, overlay, svc):
    docs = rendered[overlay]
    pod = _pod(docs, svc)
    c = container(pod, svc.container)
    pre = c.get("lifecycle", {}).get("preStop", {})
    sleep = 0
    if "exec" in pre:
        argv = pre["exec"]["command"]
        assert argv[0] == "sleep", f"unexpected preStop {argv}"
        sleep = int(argv[1])
    elif "sleep" in pre:
        sleep = int(pre["sleep"]["seconds"])
    grace = pod["terminationGracePeriodSeconds"]
    drain = _config(docs, svc).drain_seconds
    assert grace > sleep + drain, f"{svc.deployment}: grace {grace}s <= preStop {sleep}s + drain {drain}s"


@pytest.mark.parametrize("svc", SERVICES, ids=lambda s: s.deployment)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaling_and_disruption_budget(rendered, overlay, svc):
    docs = rendered[overlay]
    hpas = [h for h in find(docs, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == svc.deployment]
    assert len(hpas) == 1, f"{svc.deployment}: {len(hpas)} HPAs"
    hpa = hpas[0]
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in one(docs, "Deployment", svc.deployment)["spec"], \
        f"{svc.deployment}: the HPA owns the replica count; a replicas field would reset it on every apply"
    max_streams = _config(docs, svc).max_streams
    adapter = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-config.yaml").read_text())
    adapter_metrics = {r["name"]["as"] for r in adapter["rules"]}
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods", "streams per pod is a Pods metric"
        name = metric["pods"]["metric"]["name"]
        assert name in adapter_metrics, f"no Prometheus adapter rule serves {name}"
        target = float(metric["pods"]["target"]["averageValue"])
        assert 0 < target < max_streams, f"{svc.deployment}: HPA target {target} not below TTS_MAX_STREAMS {max_streams}"
    pdbs = [p for p in find(docs, "PodDisruptionBudget") if selects(p["spec"]["selector"], _labels(docs, svc))]
    assert len(pdbs) == 1, f"{svc.deployment}: {len(pdbs)} PodDisruptionBudgets select its pods"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_token_service_reaches_the_vocoder(rendered, overlay):
    docs = rendered[overlay]
    policies = [p for p in find(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"], _labels(docs, VOCODER))]
    assert len(policies) == 1
    spec = policies[0]["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert [list(f) for f in rule["from"]] == [["podSelector"]], "ingress must come from pods selected by label only"
    assert selects(rule["from"][0]["podSelector"], _labels(docs, TOKEN))
    assert not selects(rule["from"][0]["podSelector"], _labels(docs, VOCODER))
    assert [p["port"] for p in rule["ports"]] == [port_of(_config(docs, VOCODER).listen)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_export_telemetry_to_the_collector(rendered, overlay):
    docs = rendered[overlay]
    collector_cm = [cm for cm in find(docs, "ConfigMap") if "otel-collector-config.yaml" in cm.get("data", {})]
    assert len(collector_cm) == 1
    conf = yaml.safe_load(collector_cm[0]["data"]["otel-collector-config.yaml"])
    for pipeline, spec in conf["service"]["pipelines"].items():
        for part in ("receivers", "processors", "exporters"):
            for name in spec.get(part, []):
                assert name in (conf.get(part) or {}), f"pipeline {pipeline} uses undefined {part[:-1]} {name}"
    assert "otlp" in conf["service"]["pipelines"]["traces"]["receivers"]
    assert "batch" in conf["service"]["pipelines"]["metrics"]["processors"]
    assert "prometheus" in conf["service"]["pipelines"]["metrics"]["exporters"]
    otlp_port = port_of(conf["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])
    prom_port = port_of(conf["exporters"]["prometheus"]["endpoint"])
    collector = one(docs, "Deployment", "otel-collector")
    col_labels = collector["spec"]["template"]["metadata"]["labels"]
    col_container = collector["spec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in col_container["ports"]} >= {otlp_port, prom_port}
    for svc in SERVICES:
        env = container_env(docs, container(_pod(docs, svc), svc.container))
        url = urlparse(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc") == "grpc"
        assert url.scheme == "http" and url.port == otlp_port, env["OTEL_EXPORTER_OTLP_ENDPOINT"]
        target = one(docs, "Service", url.hostname.split(".")[0])
        assert selects({"matchLabels": target["spec"]["selector"]}, col_labels)
        assert otlp_port in [p["port"] for p in target["spec"]["ports"]]
        assert env["OTEL_SERVICE_NAME"] == svc.deployment
        # The pod name reaches Prometheus as k8s_pod_name: what the HPA metric is keyed on.
        assert "k8s.pod.name=$(POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down_and_sized(rendered, overlay):
    docs = rendered[overlay]
    for where, pod in pod_specs(docs):
        sec = pod.get("securityContext", {})
        assert sec.get("runAsNonRoot") is True and sec.get("runAsUser", 0) != 0, f"{where} may run as root"
        assert pod.get("automountServiceAccountToken") is False, f"{where} mounts an API token"
        # The "restricted" Pod Security Standard the namespaces enforce.
        assert sec.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: no RuntimeDefault seccomp"
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():
            assert set(v) - {"name"} <= RESTRICTED_VOLUMES, f"{where}: volume {v} not allowed by the restricted profile"
        for c in all_containers(pod):
            csec = c.get("securityContext", {})
            assert csec.get("readOnlyRootFilesystem") is True, f"{where}/{c['name']}: root filesystem writable"
            assert csec.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}"
            assert csec.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{c['name']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), \
                    f"{where}/{c['name']}: no cpu/memory {kind}"
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{where}/{c['name']} mounts undefined volume {m['name']}"
                vol = volumes[m["name"]]
                assert len(set(vol) - {"name"}) == 1, f"{where}: volume {m['name']} has several sources: {vol}"
    for svc in SERVICES:
        c = container(_pod(docs, svc), svc.container)
        assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, f"{svc.deployment}: no writable /tmp"
    for ns in find(docs, "Namespace"):
        assert ns["metadata"]["labels"].get("pod-security.kubernetes.io/enforce") == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_requests_only_where_gpus_are_meant(rendered, overlay):
    docs = rendered[overlay]
    for svc in SERVICES:
        res = container(_pod(docs, svc), svc.container)["resources"]
        gpu = res["limits"].get("nvidia.com/gpu")
        if overlay == "gpu":
            assert gpu == 1 and res["requests"].get("nvidia.com/gpu") == 1, f"{svc.deployment}: {res}"
            assert _config(docs, svc).engine in ("trtllm", "tensorrt")
        else:
            assert gpu is None, f"{overlay} {svc.deployment} asks for a GPU"
            assert _config(docs, svc).device == "cpu"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_export_commands_parse_with_the_real_cli(rendered, overlay):
    """Every ``tts-export`` the manifests run is accepted by ``tts-export``'s own parser."""
    from export.cli import build_parser

    parser = build_parser()
    seen = 0
    for where, pod in pod_specs(rendered[overlay]):
        for c in all_containers(pod):
            for argv in command_lines(c.get("command", []) + c.get("args", [])):
                if argv[0] != "tts-export":
                    continue
                seen += 1
                try:
                    parser.parse_args(argv[1:])
                except SystemExit:
                    pytest.fail(f"{overlay} {where}/{c['name']}: `{' '.join(argv)}` is rejected by tts-export")
    assert seen, f"{overlay}: no tts-export step (engines / demo checkpoint must come from the export tooling)"


def test_gpu_export_jobs_build_the_engines_the_services_load(rendered):
    docs = rendered["gpu"]
    for svc, part in ((TOKEN, "t3"), (VOCODER, "s3gen")):
        engine_dir = _config(docs, svc).engine_dir
        m = re.fullmatch(rf"/engines/(v\d+)/{part}", engine_dir)
        assert m, f"{svc.deployment}: TTS_ENGINE_DIR {engine_dir!r} is not /engines/vN/{part}"
        job = one(docs, "Job", f"tts-export-{part}-{m.group(1)}")
        pod = job["spec"]["template"]["spec"]
        image = container(_pod(docs, svc), svc.container)["image"]
        for c in all_containers(pod):
            assert c["image"] == image, f"{job['metadata']['name']}/{c['name']} builds in {c['image']}, serves in {image}"
            env = container_env(docs, c)
            assert env.get("TTS_ENGINE_DIR") == engine_dir
        assert any("nvidia.com/gpu" in c["resources"]["limits"] for c in all_containers(pod)), \
            "engines are built on the GPU that serves them"
        # The service waits for exactly that folder.
        wait = [c for c in _pod(docs, svc).get("initContainers", []) if c["name"] == "wait-for-engine"]
        assert wait and "$TTS_ENGINE_DIR" in " ".join(wait[0]["command"])
        assert container_env(docs, wait[0])["TTS_ENGINE_DIR"] == engine_dir


SERVER_SOURCES = {TOKEN.deployment: ROOT / "token_service" / "server.py",
                  VOCODER.deployment: ROOT / "vocoder_service" / "server.py"}


@pytest.mark.parametrize("svc", SERVICES, ids=lambda s: s.deployment)
def test_hpa_metric_is_a_gauge_the_server_registers(rendered, svc):
    """The HPA's Prometheus name is the OpenTelemetry gauge name with dots as underscores (the
    collector's exporter runs with add_metric_suffixes: false); the server must register that gauge."""
    source = SERVER_SOURCES[svc.deployment].read_text()
    for overlay in OVERLAYS:
        (hpa,) = [h for h in find(rendered[overlay], "HorizontalPodAutoscaler")
                  if h["spec"]["scaleTargetRef"]["name"] == svc.deployment]
        for metric in hpa["spec"]["metrics"]:
            otel_name = metric["pods"]["metric"]["name"].replace("_", ".")
            assert re.search(rf'gauge\(\s*"{re.escape(otel_name)}"', source), \
                f"{overlay}: HPA of {svc.deployment} scales on {otel_name}, which {SERVER_SOURCES[svc.deployment].name} does not register"


def test_token_service_balances_vocode_streams_round_robin():
    """dns:/// resolves every vocoder pod, but gRPC's default policy (pick_first) would still send
    every stream to the first address: the token service's vocoder channel must ask for round_robin."""
    source = SERVER_SOURCES[TOKEN.deployment].read_text()
    assert re.search(r"grpc\.service_config", source) and "round_robin" in source, (
        "token_service/server.py: the vocoder channel needs the option "
        "('grpc.service_config', json.dumps({'loadBalancingConfig': [{'round_robin': {}}]})) "
        "for TTS_VOCODER_TARGET=dns:///tts-vocoder-headless... to spread streams over the vocoder pods")


def test_export_jobs_run_build_scripts_the_export_tooling_writes(rendered):
    """Steps such as ``bash <work>/checkpoint/build_engine.sh`` run files that ``tts-export`` generates:
    each such file name must be one the export package writes."""
    export_source = "\n".join(p.read_text() for p in (ROOT / "export").glob("*.py"))
    scripts = set()
    for where, pod in pod_specs(rendered["gpu"]):
        for c in all_containers(pod):
            for argv in command_lines(c.get("command", []) + c.get("args", [])):
                if argv[0] in ("bash", "sh", "python3", "python") and len(argv) > 1 and argv[1].startswith("/engines/"):
                    scripts.add(argv[1].rsplit("/", 1)[1])
    assert scripts, "no generated build script is run by the export Jobs"
    for name in sorted(scripts):
        assert f'"{name}"' in export_source, f"the export Jobs run {name}, which no export module writes"
