"""Import upstream ``chatterbox-tts`` 0.1.7 as a test oracle (see tests/upstream/README.md).

Use ``upstream = load_upstream()`` in tests; it returns the imported ``chatterbox`` package with
the torchaudio stand-in on ``sys.path``.  Tests that need it are marked ``@pytest.mark.upstream``.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

_SHIM = Path(__file__).resolve().parent / "upstream_shim"


def load_upstream() -> ModuleType:
    """Return the upstream ``chatterbox`` package, importing it on first use."""
    if str(_SHIM) not in sys.path:
        sys.path.insert(0, str(_SHIM))
    if "torchaudio" in sys.modules and not getattr(sys.modules["torchaudio"], "__version__", "").endswith("stand-in"):
        raise RuntimeError("a real torchaudio was imported before the upstream oracle")
    _perth_stand_in()
    return importlib.import_module("chatterbox")


def _perth_stand_in() -> None:
    """``ChatterboxTurboTTS.__init__`` builds ``perth.PerthImplicitWatermarker()``; in this
    environment perth's implicit watermarker is unavailable (the name is ``None``), so
    ``from_local`` would fail after loading every weight. The watermark is applied to the final
    audio only and is no part of what we compare: use perth's own ``DummyWatermarker``."""
    import perth

    if getattr(perth, "PerthImplicitWatermarker", None) is None:
        perth.PerthImplicitWatermarker = perth.DummyWatermarker


def upstream_module(name: str) -> ModuleType:
    """Import ``chatterbox.<name>`` (e.g. ``"tts_turbo"``, ``"models.t3.t3"``)."""
    load_upstream()
    return importlib.import_module(f"chatterbox.{name}")
