"""Stand-in for ``torchaudio.compliance`` (see the package docstring)."""
