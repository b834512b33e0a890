"""Stand-in for ``torchaudio.transforms``: importable, raises on any use."""
from . import _fail


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    _fail(f"transforms.{name}")
