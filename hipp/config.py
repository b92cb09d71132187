"""YAML configs into typed dataclasses: an unknown key or a wrong type is one line naming the key."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from .errors import HippError


def _check(value, tp, key: str):
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check(value, arg, key)
            except HippError:
                continue
        raise HippError(f"config key '{key}': expected {tp}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise HippError(f"config key '{key}': expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise HippError(f"config key '{key}': expected a list, got {value!r}")
        (arg, *_) = typing.get_args(tp) or (typing.Any,)
        return [_check(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise HippError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is type(None):
        if value is not None:
            raise HippError(f"config key '{key}': expected null, got {value!r}")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise HippError(f"config key '{key}': expected {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise HippError(f"config key '{key}': expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a mapping, checking keys and types recursively."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise HippError(f"unknown config key '{prefix}{key}'")
    kwargs = {k: _check(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise HippError(f"config section '{prefix.rstrip('.') or 'top level'}': {e}") from None


def load_config(cls, path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise HippError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise HippError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise HippError(f"{path} must hold a mapping at the top level")
    return from_dict(cls, data)
