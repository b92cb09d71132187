"""Preferences: points on the probability simplex over a controller's objective names.

A preference arrives as a SPEC string (`utility=0.6,flops=0.4` or positional `0.6,0,0.4,0`), a
mapping, a sequence or a tensor; every form is validated the same way and normalised to sum 1.
Training samples preferences from a Dirichlet; sweeps and fronts use Das-Dennis grids.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import combinations

import torch

from ..errors import HippError

DEFAULT_OBJECTIVES = ("utility", "grounding", "flops", "params")
COSTS = ("flops", "params", "latency")  # the cost objectives; the others measure quality


def check_target_objectives(names) -> None:
    """A FLOPs target replaces the cost weights, so it needs 'flops' and something else to trade it for."""
    if "flops" not in names or all(n in COSTS for n in names):
        raise HippError(f"a FLOPs target needs the 'flops' objective and a quality objective; got {list(names)}")



def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise HippError(f"preference value for {what} is not a number: {text!r}") from None


def parse_spec(spec: str, names: Sequence[str]) -> dict[str, float]:
    """`name=value,...` (missing names are 0) or positional values in `names` order -> normalised dict."""
    names = list(names)
    if not isinstance(spec, str) or not spec.strip():
        raise HippError(f"empty preference; give name=value pairs over {', '.join(names)} "
                        f"or {len(names)} comma-separated values")
    parts = [p.strip() for p in spec.split(",")]
    if any(not p for p in parts):
        raise HippError(f"preference {spec!r} has an empty item (stray comma?)")
    named = ["=" in p for p in parts]
    if any(named) and not all(named):
        raise HippError(f"preference {spec!r} mixes name=value pairs and positional values; use one form")
    if all(named):
        values: dict[str, float] = {}
        for part in parts:
            key, _, text = part.partition("=")
            key = key.strip()
            if key not in names:
                raise HippError(f"unknown objective {key!r} in preference; expected one of {', '.join(names)}")
            if key in values:
                raise HippError(f"objective {key!r} appears twice in preference {spec!r}")
            values[key] = _number(text.strip(), repr(key))
        raw = [values.get(n, 0.0) for n in names]
    else:
        if len(parts) != len(names):
            raise HippError(f"preference {spec!r} has {len(parts)} positional values; expected "
                            f"{len(names)} ({', '.join(names)})")
        raw = [_number(p, repr(n)) for p, n in zip(parts, names)]
    return dict(zip(names, normalize(raw, names)))


def normalize(values: Sequence[float], names: Sequence[str]) -> list[float]:
    """Check non-negative, finite, positive sum; return values divided by their sum."""
    values = [float(v) for v in values]
    for v, n in zip(values, names):
        if not math.isfinite(v):
            raise HippError(f"preference value for {n!r} must be finite, got {v}")
        if v < 0:
            raise HippError(f"preference value for {n!r} must be >= 0, got {v:g}")
    total = sum(values)
    if not math.isfinite(total):  # each value finite, yet e.g. 1e308 + 1e308 overflows
        raise HippError(f"preference weights {', '.join(f'{v:g}' for v in values)} add up beyond the largest "
                        "float; only their ratios matter, so give smaller values")
    if total <= 0:
        raise HippError(f"preference weights sum to 0; at least one of {', '.join(names)} must be positive")
    return [v / total for v in values]


def as_dict(pref, names: Sequence[str]) -> dict[str, float]:
    """Any accepted preference form (SPEC, mapping, sequence, 1-D tensor) -> normalised name->value."""
    names = list(names)
    if isinstance(pref, str):
        return parse_spec(pref, names)
    if isinstance(pref, Mapping):
        unknown = [k for k in pref if k not in names]
        if unknown:
            raise HippError(f"unknown objective {unknown[0]!r} in preference; expected one of {', '.join(names)}")
        raw = [pref.get(n, 0.0) for n in names]
    else:
        if isinstance(pref, torch.Tensor):
            if pref.dim() != 1:
                raise HippError(f"a single preference must be 1-D, got shape {tuple(pref.shape)}")
            pref = pref.tolist()
        try:
            raw = list(pref)
        except TypeError:
            raise HippError(f"cannot read a preference from {type(pref).__name__}") from None
        if len(raw) != len(names):
            raise HippError(f"preference has {len(raw)} values; expected {len(names)} ({', '.join(names)})")
    try:
        raw = [float(v) for v in raw]
    except (TypeError, ValueError):
        raise HippError(f"preference values must be numbers, got {raw!r}") from None
    return dict(zip(names, normalize(raw, names)))


def as_tensor(pref, names: Sequence[str], dtype=torch.float32) -> torch.Tensor:
    """Any accepted preference form -> normalised [K] tensor in `names` order."""
    d = as_dict(pref, names)
    return torch.tensor([d[n] for n in names], dtype=dtype)


def format_spec(pref: Mapping[str, float], digits: int = 4) -> str:
    """The SPEC string echoed back to users: `utility=0.6,grounding=0,...`."""
    return ",".join(f"{k}={round(float(v), digits):g}" for k, v in pref.items())


# --- sampling -------------------------------------------------------------------------------

def _standard_gamma(alpha: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gamma(alpha, 1) samples drawn only from `generator` (torch's own sampler cannot take one).

    Marsaglia-Tsang squeeze-rejection for alpha >= 1; alpha < 1 uses Gamma(alpha + 1) * U^(1/alpha).
    """
    boost = alpha < 1
    a = torch.where(boost, alpha + 1, alpha)
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(a)
    todo = torch.ones_like(a, dtype=torch.bool)
    while todo.any():  # each round accepts >95% of what is left
        x = torch.randn(a.shape, generator=generator, dtype=a.dtype)
        u = torch.rand(a.shape, generator=generator, dtype=a.dtype)
        v = (1 + c * x) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-300)) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        take = todo & ok
        out[take] = (d * v)[take]
        todo &= ~ok
    u = torch.rand(a.shape, generator=generator, dtype=a.dtype).clamp_min(1e-300)
    return torch.where(boost, out * u ** (1.0 / alpha), out)


def sample_dirichlet(n: int, alpha, n_objectives: int | None = None,
                     generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """[n, K] preferences from Dirichlet(alpha); alpha is a scalar (needs n_objectives) or [K]."""
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    if alpha.dim() == 0:
        if n_objectives is None:
            raise HippError("a scalar Dirichlet alpha needs n_objectives")
        alpha = alpha.expand(n_objectives)
    if alpha.dim() != 1 or not bool(torch.isfinite(alpha).all()) or bool((alpha <= 0).any()):
        raise HippError(f"Dirichlet alpha must be positive and finite, got {alpha.tolist()}")
    g = _standard_gamma(alpha.expand(n, -1).contiguous(), generator)
    g = g.clamp_min(1e-300)  # tiny alphas can underflow to 0 in every coordinate
    return (g / g.sum(-1, keepdim=True)).to(dtype)


# --- grids ----------------------------------------------------------------------------------

def grid_size(n_objectives: int, divisions: int) -> int:
    return math.comb(divisions + n_objectives - 1, n_objectives - 1)


def simplex_grid(n_objectives: int, n_points: int | None = None, divisions: int | None = None,
                 dtype=torch.float32) -> torch.Tensor:
    """Das-Dennis grid: every point with coordinates in {0, 1/H, ..., 1} summing to 1, [M, K].

    Give `divisions` (H) directly, or `n_points`: then H is chosen so that M is closest to it
    (ties go to the larger grid). M = C(H + K - 1, K - 1).
    """
    if n_objectives < 1:
        raise HippError(f"a simplex grid needs at least one objective, got {n_objectives}")
    if (n_points is None) == (divisions is None):
        raise HippError("give exactly one of n_points or divisions for a simplex grid")
    if divisions is None:
        if n_points < 1:
            raise HippError(f"a simplex grid needs at least one point, got {n_points}")
        if n_objectives == 1:
            divisions = 1
        else:
            divisions = 1
            while grid_size(n_objectives, divisions + 1) <= n_points:
                divisions += 1
            low, high = grid_size(n_objectives, divisions), grid_size(n_objectives, divisions + 1)
            if high - n_points <= n_points - low:
                divisions += 1
    if divisions < 1:
        raise HippError(f"a simplex grid needs at least one division, got {divisions}")
    # Stars and bars: choosing K-1 bar positions among H+K-1 slots gives each composition once.
    rows = []
    slots = divisions + n_objectives - 1
    for bars in combinations(range(slots), n_objectives - 1):
        edges = (-1, *bars, slots)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(n_objectives)])
    return torch.tensor(rows, dtype=torch.float64).div(divisions).to(dtype)


def sweep(names: Sequence[str], first: str, second: str, n_points: int,
          rest: Mapping[str, float] | None = None, dtype=torch.float32) -> torch.Tensor:
    """[n_points, K] preferences moving weight from `first` (row 0) to `second` (last row).

    `rest` holds fixed raw weights for the other objectives (default 0); the pair shares the
    remaining mass 1 - sum(rest), so every row sums to 1.
    """
    names = list(names)
    for n in (first, second, *(rest or {})):
        if n not in names:
            raise HippError(f"unknown objective {n!r} in sweep; expected one of {', '.join(names)}")
    if first == second:
        raise HippError(f"a sweep needs two different objectives, got {first!r} twice")
    if n_points < 2:
        raise HippError(f"a sweep needs at least 2 points, got {n_points}")
    rest = dict(rest or {})
    if first in rest or second in rest:
        raise HippError("the swept objectives cannot also have fixed weights in `rest`")
    normalize(list(rest.values()) + [1.0], list(rest) + [first])  # validates rest values
    mass = 1.0 - sum(rest.values())
    if mass <= 0:
        raise HippError(f"fixed sweep weights sum to {1 - mass:g}; they must leave room below 1")
    t = torch.linspace(0, 1, n_points, dtype=torch.float64)
    out = torch.zeros(n_points, len(names), dtype=torch.float64)
    for n, v in rest.items():
        out[:, names.index(n)] = v
    out[:, names.index(first)] = mass * (1 - t)
    out[:, names.index(second)] = mass * t
    return out.to(dtype)
