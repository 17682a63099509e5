"""Run configs: dataclasses filled from a YAML file and `--set key=value` flags.

Every training method has one dataclass (`RewardConfig`, `DPORoundConfig`, ...); each field
carries a help text and a CPU-friendly default, and `__post_init__` rejects bad values with a
message saying how to fix them. This module turns loose values (YAML, command-line strings,
the JSON stored on a round) into those dataclasses, naming the valid keys when one is unknown.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A config value or key is wrong; the message names it and what would be accepted."""


def field_help(cls) -> dict[str, str]:
    """{field name: help text} of a config dataclass."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _coerce(name: str, value, annotation):
    """Turn a loose value (often a string from the command line) into the field's type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        if isinstance(value, str) and value.strip().lower() in ("none", "null") and type(None) in options:
            return None
        errors = []
        # Prefer an option the value already is (a list stays a list, a string a string).
        ordered = sorted(options, key=lambda t: not isinstance(value, typing.get_origin(t) or t))
        for option in ordered:
            if option is type(None):
                continue
            try:
                return _coerce(name, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: cannot use {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(annotation) or (str,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(name, v, item_type) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name} must be text, got {value!r}")
    return value


def config_from_dict(cls, values: dict | None, *, what: str | None = None):
    """Build the dataclass `cls` from `values`, coercing strings to the fields' types.

    Unknown keys and invalid values raise ConfigError naming the key and the valid choices.
    """
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    what = what or cls.__name__
    if unknown:
        raise ConfigError(
            f"unknown {'key' if len(unknown) == 1 else 'keys'} {', '.join(map(repr, unknown))} for {what}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(name, value, hints[name]) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{what}: {e}") from None


def parse_assignments(assignments: list[str] | None) -> dict:
    """`["beta=0.2", "loss_type=ipo"]` → {"beta": "0.2", "loss_type": "ipo"} (typed later)."""
    values = {}
    for item in assignments or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not key=value (e.g. --set learning_rate=1e-4)")
        values[key.strip()] = value.strip()
    return values


def load_config_file(path) -> dict:
    """A YAML (or JSON) mapping of config keys to values."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values, not a {type(data).__name__}")
    return data
