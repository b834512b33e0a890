"""Every rendered Kubernetes document is valid against the Kubernetes OpenAPI schemas, offline.

``kubectl kustomize`` renders each overlay; ``kubernetes-validate`` (the dev extra) checks each
document in strict mode (unknown fields are errors) against the schemas it ships for the pinned
Kubernetes versions, so nothing is fetched.  A kind it has no schema for is an error here (its CLI
would only warn): these manifests use built-in kinds only.
"""
from __future__ import annotations

import copy

import kubernetes_validate
import pytest
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

from deploy_support import K8S_VERSIONS, OVERLAYS, one


def _errors(docs: list[dict], version: str) -> list[str]:
    errors = []
    for d in docs:
        where = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{where}: {path}: {e.message}")
        except SchemaNotFoundError as e:
            errors.append(f"{where}: {e.message}")
    return errors


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_is_schema_valid(rendered, overlay, version):
    docs = rendered[overlay]
    assert len(docs) >= 10, f"{overlay}: only {len(docs)} documents rendered"
    errors = _errors(docs, version)
    assert not errors, f"{overlay} against Kubernetes {version}:\n" + "\n".join(errors)


def test_validator_rejects_what_it_should(rendered):
    """The validation above is not vacuous: an unknown field, a wrong type and an unknown kind fail."""
    docs = rendered[OVERLAYS[0]]
    version = K8S_VERSIONS[0]
    dep = copy.deepcopy(one(docs, "Deployment", "tts-token-service"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["servcie"] = "typo"
    assert _errors([dep], version), "strict validation accepted an unknown field"

    dep = copy.deepcopy(one(docs, "Deployment", "tts-token-service"))
    dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "forty"
    assert _errors([dep], version), "validation accepted a string for an integer"

    assert _errors([{"apiVersion": "example.com/v1", "kind": "Nonsense", "metadata": {"name": "x"}}], version)
