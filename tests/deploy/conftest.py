"""Fixtures of the deploy tests: every overlay rendered once per session by the real ``kubectl kustomize``.

The tests skip only when ``kubectl`` is not installed (CI has it; docs/DEPLOY.md says so).
"""
from __future__ import annotations

import pytest

from deploy_support import K8S, OVERLAYS, kubectl, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """``{overlay name: rendered documents}`` for every overlay under deploy/k8s/overlays."""
    if kubectl() is None:
        pytest.skip("kubectl is not installed: cannot render the kustomize overlays")
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}
