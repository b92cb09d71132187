"""YAML configs into typed dataclasses: an unknown key, a wrong type or a value no setting can take
(infinite, NaN, an integer too large for any count) is one line naming the key."""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path

import yaml

from .errors import HippError

# No count, size or seed in a config comes near this; larger integers (10**40 steps) are typos or
# overflow probes, and beyond it floats (schedules, ratios) stop representing integers exactly.
MAX_INT = 2**53
# YAML 1.1 (PyYAML) reads `1e-3` as a string: it wants a dot and a signed exponent (1.0e-3).
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def check_numbers(value, key: str = "", _seen: set | None = None) -> None:
    """Refuse non-finite floats and integers beyond MAX_INT anywhere in a loaded mapping, naming
    the key. Shared YAML anchors are visited once, so aliases cannot make this walk explode."""
    seen = set() if _seen is None else _seen
    if isinstance(value, (dict, list, tuple)):
        if id(value) in seen:
            return
        seen.add(id(value))
        pairs = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in pairs:
            sub = f"{key}[{k}]" if not isinstance(value, dict) else (f"{key}.{k}" if key else str(k))
            check_numbers(v, sub, seen)
    elif isinstance(value, float) and not math.isfinite(value):
        raise HippError(f"config key '{key}': expected a finite number, got {value}")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise HippError(f"config key '{key}': {_short(value)} is out of range (at most 2**53 in size)")


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
        hint = ""
        if tp is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            hint = " (YAML reads a number without a dot as text: write 1.0e-3, not 1e-3)"
        raise HippError(f"config key '{key}': expected {tp.__name__}, got {value!r}{hint}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a mapping, checking keys and types recursively."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if not prefix:
        check_numbers(data)
    for key in data:
        if key not in names:
            raise HippError(f"unknown config key '{prefix}{key}'")
    kwargs = {k: _check(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, OverflowError) as e:
        raise HippError(f"config section '{prefix.rstrip('.') or 'top level'}': {str(e).splitlines()[0]}") from None


def _config_text(path: Path) -> str:
    from .data.user import read_bytes, show

    raw = read_bytes(path, "config file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise HippError(f"config file {show(path)} is not UTF-8 text (byte {e.start} is {raw[e.start]:#04x})") from None


def load_config(cls, path: str | Path):
    path = Path(path)
    text = _config_text(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise HippError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise HippError(f"{path} is nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise HippError(f"{path} must hold a mapping at the top level")
    return from_dict(cls, data)


# --- value rules for dataclass __post_init__ checks ---------------------------------------------

Rule = tuple[typing.Callable[[typing.Any], bool], str]


def _num(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _real(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return abs(v) <= MAX_INT if isinstance(v, int) else math.isfinite(v)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def at_least(low: float) -> Rule:
    return (lambda v: _real(v) and v >= low), f">= {_num(low)}"


def above(low: float) -> Rule:
    return (lambda v: _real(v) and v > low), f"> {_num(low)}"


def within(low: float, high: float, open_low: bool = False) -> Rule:
    return ((lambda v: _real(v) and (low < v if open_low else low <= v) and v <= high),
            f"in {'(' if open_low else '['}{_num(low)}, {_num(high)}]")


def finite() -> Rule:
    return _real, "a finite number"


def one_of(choices) -> Rule:
    return (lambda v: v in choices), f"one of {', '.join(map(str, choices))}"


def check_values(checks: dict[str, tuple[typing.Any, Rule]]) -> None:
    """{key: (value, rule)} -> the first broken rule as one line naming the key, the rule and the value."""
    for key, (value, (ok, rule)) in checks.items():
        if not ok(value):
            raise HippError(f"config key '{key}' must be {rule}, got {_short(value)}")
