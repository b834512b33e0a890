"""Service configuration: one dataclass per service, filled from flags, then ``TTS_*`` env, then defaults.

Every field of a config dataclass is a setting. Its environment variable is ``TTS_<NAME>`` and its
flag ``--<name-with-dashes>`` (``max_streams`` -> ``TTS_MAX_STREAMS`` / ``--max-streams``). The
field's metadata carries the help text and, optionally, the allowed choices.

    cfg = load_config(TokenServiceConfig, argv)          # flags > env > defaults, then validated
    [f.env for f in config_fields(TokenServiceConfig)]   # what deploy manifests may set

A default of ``REQUIRED`` means the setting has no default and must come from a flag or the env.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

ENV_PREFIX = "TTS_"


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()
"""Marks a setting that has no default."""

C = TypeVar("C")


class ConfigError(ValueError):
    """A setting is missing or has a bad value; the message names the flag and env variable."""


def setting(default: Any, help: str, *, choices: Sequence[str] | None = None) -> Any:
    """A config dataclass field: ``default`` (or ``REQUIRED``), a help line, optional allowed values."""
    meta = {"help": help, "choices": tuple(choices) if choices else None}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class FieldSpec:
    """One setting as a deploy manifest or ``--help`` sees it."""

    name: str
    env: str
    flag: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def _base_type(annotation: Any) -> type:
    """``int``, ``float``, ``str`` or ``bool`` from an annotation such as ``str | None``."""
    if isinstance(annotation, type):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type):
        return args[0]
    raise TypeError(f"unsupported config field type {annotation!r}")


def config_fields(cls: type) -> list[FieldSpec]:
    """The settings of config dataclass ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        specs.append(
            FieldSpec(
                name=f.name,
                env=ENV_PREFIX + f.name.upper(),
                flag="--" + f.name.replace("_", "-"),
                type=_base_type(hints[f.name]),
                default=f.default,
                help=f.metadata.get("help", ""),
                choices=f.metadata.get("choices"),
            )
        )
    return specs


def _convert(spec: FieldSpec, raw: str, source: str) -> Any:
    try:
        if spec.type is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        value = spec.type(raw)
    except ValueError:
        raise ConfigError(
            f"{source}: {raw!r} is not a valid {spec.type.__name__} ({spec.flag} / {spec.env})"
        ) from None
    if spec.choices and value not in spec.choices:
        raise ConfigError(
            f"{source}: {raw!r} is not one of {', '.join(spec.choices)} ({spec.flag} / {spec.env})"
        )
    return value


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per setting; ``--help`` shows env names and defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip().split("\n")[0])
    for spec in config_fields(cls):
        default = "required" if spec.required else spec.default
        extra = f" One of: {', '.join(spec.choices)}." if spec.choices else ""
        parser.add_argument(
            spec.flag,
            dest=spec.name,
            default=None,
            metavar=spec.name.upper(),
            help=f"{spec.help}{extra} [env {spec.env}; default: {default}]",
        )
    return parser


def load_config(
    cls: type[C],
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    prog: str | None = None,
    **overrides: Any,
) -> C:
    """Build ``cls`` from ``overrides`` (Python values), then flags in ``argv``, then env, then defaults.

    Raises ``ConfigError`` naming the flag and variable of a missing or bad setting. If ``cls`` has a
    ``validate()`` method it is called last (it may fill derived defaults and raise ``ConfigError``).
    """
    environ = os.environ if environ is None else environ
    flags = vars(build_parser(cls, prog=prog).parse_args(list(argv or [])))
    values: dict[str, Any] = {}
    for spec in config_fields(cls):
        if spec.name in overrides:
            values[spec.name] = overrides.pop(spec.name)
        elif flags.get(spec.name) is not None:
            values[spec.name] = _convert(spec, flags[spec.name], spec.flag)
        elif environ.get(spec.env, "") != "":
            values[spec.name] = _convert(spec, environ[spec.env], spec.env)
        elif spec.required:
            raise ConfigError(f"{spec.name} is required: set {spec.flag} or {spec.env}")
        else:
            values[spec.name] = spec.default
    if overrides:
        raise TypeError(f"unknown settings for {cls.__name__}: {', '.join(overrides)}")
    cfg = cls(**values)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def check_positive(cfg: Any, *names: str, allow_zero: bool = False) -> None:
    """Raise ``ConfigError`` if a numeric setting is negative (or zero unless ``allow_zero``)."""
    for name in names:
        value = getattr(cfg, name)
        if value < 0 or (value == 0 and not allow_zero):
            env = ENV_PREFIX + name.upper()
            raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value} (--{name.replace('_', '-')} / {env})")
