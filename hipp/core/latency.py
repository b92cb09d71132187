"""Latency as a cost: a per-block latency model measured on one device, and a plan's latency from it.

A profile (made by `hipp profile`, hipp/evaluation/profile.py) holds, for each *measure* of a model
(a CLIP model's image and text encoders, named as its stages; a LLaVA's "prefill" and one "decode" step), the time
the measure spends outside its blocks (`fixed_ms`: embeddings, final norms, heads) and, for each
block *kind* (layers of one stage with one shape), the time of one kept block on a grid of
(attention units kept, MLP channels kept). A dropped layer costs nothing: it is removed.

The grid is turned into a fitted grid by one of three forms, and every prediction is a bilinear
interpolation on the fitted grid, so all three price soft (expected) counts differentiably:

- table:    the measured grid itself;
- additive: time = A(units) + M(channels), piecewise linear, least squares over the grid;
- linear:   time = a + b * units + c * channels, least squares.

Fitted grids are made non-decreasing along both axes (so a plan only gets slower as units are
added, which the budget fitter's binary search needs) and non-negative. The profile records which
form predicted its own validation plans best; that form is the default.

A plan's latency is, per measure, fixed_ms + the sum over kept layers of their kind's time; the
total is the measures' sum with their weights (1 each for CLIP, 1 + steps for a LLaVA's prefill and
its decoded tokens). Times are milliseconds per batch of the profile's batch size.
"""
from __future__ import annotations

import math

import torch

from ..errors import HippError
from .space import LayerSpec, PruneSpace

FORMAT = "hipp-latency-profile"
VERSION = 1
FORMS = ("table", "additive", "linear")
# the grid is in channels, so a profile serves any channel grouping of the same model
SHAPE_FIELDS = tuple(f for f in LayerSpec.__dataclass_fields__ if f not in ("tower", "index", "channel_group"))


def shape_key(spec: LayerSpec) -> dict:
    """The fields that decide a block's latency: everything but its stage, position and channel grouping."""
    return {f: getattr(spec, f) for f in SHAPE_FIELDS}


# --- fitting a measured grid ---------------------------------------------------------------------

def _least_squares(design: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(design, y.unsqueeze(-1)).solution.squeeze(-1)


def fit_grid(units: list[int], channels: list[int], ms: list[list[float]], form: str) -> torch.Tensor:
    """The fitted grid [len(units), len(channels)] of a form (module doc), monotone and non-negative."""
    if form not in FORMS:
        raise HippError(f"unknown latency form {form!r}; use one of {', '.join(FORMS)}")
    y = torch.tensor(ms, dtype=torch.float64)
    nu, nc = y.shape
    if form == "table":
        grid = y
    else:
        u = torch.tensor(units, dtype=torch.float64).repeat_interleave(nc)
        c = torch.tensor(channels, dtype=torch.float64).repeat(nu)
        if form == "linear":
            design = torch.stack([torch.ones_like(u), u, c], 1)
        else:  # one value per unit knot, plus one per channel knot past the first
            rows = torch.arange(nu * nc)
            design = torch.zeros(nu * nc, nu + nc - 1, dtype=torch.float64)
            design[rows, rows // nc] = 1.0
            cols = rows % nc
            design[rows[cols > 0], nu + cols[cols > 0] - 1] = 1.0
        grid = (design @ _least_squares(design, y.flatten())).view(nu, nc)
    return grid.clamp(min=0).cummax(0).values.cummax(1).values


def _bracket(x: torch.Tensor, knots: torch.Tensor):
    """Index of the knot at or below x (clamped to the grid) and the weight of the next knot."""
    x = x.clamp(float(knots[0]), float(knots[-1]))
    j = (torch.searchsorted(knots, x.detach().contiguous(), right=True) - 1).clamp(0, len(knots) - 2)
    return j, (x - knots[j]) / (knots[j + 1] - knots[j])


def bilinear(grid: torch.Tensor, units: torch.Tensor, channels: torch.Tensor,
             u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The grid interpolated at counts (u, c) of any (equal) shape; differentiable in u and c."""
    ju, wu = _bracket(u.to(grid.dtype), units)
    jc, wc = _bracket(c.to(grid.dtype), channels)
    return ((1 - wu) * (1 - wc) * grid[ju, jc] + (1 - wu) * wc * grid[ju, jc + 1]
            + wu * (1 - wc) * grid[ju + 1, jc] + wu * wc * grid[ju + 1, jc + 1])


class BlockKind:
    """One block kind's measured grid and its fitted grid under the model's form."""

    def __init__(self, entry: dict, form: str):
        self.measure, self.shape = entry["measure"], entry["shape"]
        self.units = torch.tensor(entry["units"], dtype=torch.float64)
        self.channels = torch.tensor(entry["channels"], dtype=torch.float64)
        self.ms = entry["ms"]
        self.grid = fit_grid(entry["units"], entry["channels"], entry["ms"], form)

    def __call__(self, u, c) -> torch.Tensor:
        u, c = torch.broadcast_tensors(torch.as_tensor(u, dtype=torch.float64), torch.as_tensor(c, dtype=torch.float64))
        return bilinear(self.grid, self.units, self.channels, u, c)

    def at(self, u: float, c: float) -> float:
        return float(self(u, c))


# --- the model ------------------------------------------------------------------------------------

class LatencyModel:
    """A validated profile (module doc) bound to one prune space: every layer's kind per measure."""

    def __init__(self, profile: dict, space: PruneSpace, form: str | None = None, where: str = "latency profile"):
        check_profile(profile, where)
        self.profile = profile
        self.space = space
        self.form = form or profile["form"]
        if self.form not in FORMS:
            raise HippError(f"unknown latency form {self.form!r}; use one of {', '.join(FORMS)}")
        self.measures = {name: dict(m) for name, m in profile["measures"].items()}
        kinds = [BlockKind(e, self.form) for e in profile["kinds"]]
        self.kinds: dict[str, list[BlockKind | None]] = {}
        for name, m in self.measures.items():
            row = []
            for spec in space.layers:
                if spec.tower not in m["stages"]:
                    row.append(None)
                    continue
                key = shape_key(spec)
                match = [k for k in kinds if k.measure == name and k.shape == key]
                if not match:
                    raise HippError(f"{where} has no timing for {spec.tower} layer {spec.index} "
                                    f"(width {spec.width}, {spec.num_heads} units, {spec.mlp_hidden} channels) under "
                                    f"{name!r}: it was made for another model (run hipp profile on this one)")
                row.append(match[0])
            self.kinds[name] = row
        self.dense_ms = {k: float(v) for k, v in self.predict(*space.all_kept()).items()}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.measures)

    def predict(self, layer_keep, head_keep, channel_keep) -> dict[str, torch.Tensor]:
        """Milliseconds per measure and in total ("latency") for soft or hard keep values, with the same
        shapes and hierarchy as PruneSpace.costs (a unit costs only as much as its layer is kept)."""
        out = {}
        for name, m in self.measures.items():
            total = torch.as_tensor(float(m["fixed_ms"]), dtype=torch.float64)
            for i, (spec, kind) in enumerate(zip(self.space.layers, self.kinds[name])):
                if kind is None:
                    continue
                units = head_keep[i].double().sum(-1)
                chans = (channel_keep[i].double() * spec.channel_sizes()).sum(-1)
                total = total + layer_keep[..., i].double() * kind(units, chans)
            out[name] = total
        out["latency"] = sum(float(m["weight"]) * out[name] for name, m in self.measures.items())
        return out

    def ratios(self, layer_keep, head_keep, channel_keep) -> dict[str, torch.Tensor]:
        """predict() over the dense model's: "latency" and "latency/<measure>"."""
        got = self.predict(layer_keep, head_keep, channel_keep)
        out = {"latency": got["latency"] / self.dense_ms["latency"]}
        out.update({f"latency/{n}": got[n] / self.dense_ms[n] for n in self.names})
        return out

    def plan_report(self, plan) -> dict:
        """What a plan or an export records: predicted milliseconds, ratios, and the profile's identity."""
        ms = {k: float(v) for k, v in self.predict(*plan.gates).items()}
        return {"predicted_ms": ms, "dense_predicted_ms": dict(self.dense_ms),
                "predicted_ratio": ms["latency"] / self.dense_ms["latency"], "form": self.form,
                "weights": {n: float(m["weight"]) for n, m in self.measures.items()},
                **{k: self.profile.get(k) for k in ("device", "device_type", "batch", "threads", "torch")}}

    def tracker(self, eff: list[float], sizes: list[float], layers: list[int], kinds: list[str]) -> "Tracker":
        return Tracker(self, eff, sizes, layers, kinds)

    def bound_keys(self) -> tuple[str, ...]:
        return ("latency", *(f"latency/{n}" for n in self.names))


class Tracker:
    """A plan's latency ratios kept up to date while the budget fitter adds units one at a time; only
    the layer that grows is re-priced (pure floats: the top-up tries every unit)."""

    def __init__(self, model: LatencyModel, eff: list[float], sizes: list[float], layers: list[int], kinds: list[str]):
        self.model, self.sizes, self.layers, self.kinds = model, sizes, layers, kinds
        n = len(model.space.layers)
        self.kept = [False] * n
        self.units, self.chans = [0.0] * n, [0.0] * n
        for e, size, i, kind in zip(eff, sizes, layers, kinds):
            if e:
                self._count(kind, i, size)
        self.ms = {name: float(m["fixed_ms"]) + sum(self._layer(name, i) for i in range(n))
                   for name, m in model.measures.items()}

    def _count(self, kind: str, i: int, size: float) -> None:
        if kind == "layer":
            self.kept[i] = True
        elif kind == "head":
            self.units[i] += size
        else:
            self.chans[i] += size

    def _layer(self, name: str, i: int, units=None, chans=None) -> float:
        kind = self.model.kinds[name][i]
        if kind is None or not self.kept[i]:
            return 0.0
        return kind.at(self.units[i] if units is None else units, self.chans[i] if chans is None else chans)

    def _ratios(self, ms: dict) -> dict[str, float]:
        dense = self.model.dense_ms
        total = sum(float(m["weight"]) * ms[n] for n, m in self.model.measures.items())
        return {"latency": total / dense["latency"], **{f"latency/{n}": ms[n] / dense[n] for n in ms}}

    def current(self) -> dict[str, float]:
        return self._ratios(self.ms)

    def _after_ms(self, u: int) -> dict[str, float]:
        i, kind, size = self.layers[u], self.kinds[u], self.sizes[u]
        if kind == "layer":  # a layer added with no unit yet
            return {n: v + (self.model.kinds[n][i].at(0.0, 0.0) if self.model.kinds[n][i] else 0.0)
                    for n, v in self.ms.items()}
        units = self.units[i] + (size if kind == "head" else 0.0)
        chans = self.chans[i] + (size if kind == "channel" else 0.0)
        return {n: v - self._layer(n, i) + self._layer(n, i, units, chans) for n, v in self.ms.items()}

    def after(self, u: int) -> dict[str, float]:
        """The ratios if unit u (an index of budget.Units) were added."""
        return self._ratios(self._after_ms(u))

    def add(self, u: int) -> None:
        self.ms = self._after_ms(u)
        self._count(self.kinds[u], self.layers[u], self.sizes[u])


# --- the profile file ------------------------------------------------------------------------------

def _number(x, where: str, what: str, positive: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0 or (positive and x <= 0):
        raise HippError(f"{where}: {what} must be a {'positive' if positive else 'non-negative'} number, got {x!r}")
    return float(x)


def check_profile(p, where: str = "latency profile") -> None:
    """One line naming what is wrong with a profile read from a file (it is user input)."""
    if not isinstance(p, dict) or p.get("format") != FORMAT:
        raise HippError(f"{where} is not a HiPP latency profile (format {p.get('format') if isinstance(p, dict) else None!r})")
    if p.get("version") != VERSION:
        raise HippError(f"{where} has profile version {p.get('version')!r}; this HiPP reads version {VERSION}")
    if p.get("form") not in FORMS:
        raise HippError(f"{where}: form must be one of {', '.join(FORMS)}, got {p.get('form')!r}")
    measures = p.get("measures")
    if not isinstance(measures, dict) or not measures:
        raise HippError(f"{where}: 'measures' must be a non-empty object")
    for name, m in measures.items():
        if not isinstance(m, dict) or not isinstance(m.get("stages"), list):
            raise HippError(f"{where}: measure {name!r} needs 'stages', 'fixed_ms' and 'weight'")
        _number(m.get("fixed_ms"), where, f"measures.{name}.fixed_ms")
        _number(m.get("weight"), where, f"measures.{name}.weight", positive=True)
    kinds = p.get("kinds")
    if not isinstance(kinds, list):
        raise HippError(f"{where}: 'kinds' must be a list")
    for j, e in enumerate(kinds):
        what = f"kinds[{j}]"
        if not isinstance(e, dict) or e.get("measure") not in measures or not isinstance(e.get("shape"), dict):
            raise HippError(f"{where}: {what} needs a known 'measure', a 'shape', 'units', 'channels' and 'ms'")
        axes = []
        for axis in ("units", "channels"):
            knots = e.get(axis)
            if (not isinstance(knots, list) or len(knots) < 2
                    or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in knots)
                    or any(a >= b for a, b in zip(knots, knots[1:]))):
                raise HippError(f"{where}: {what}.{axis} must list at least two increasing whole numbers")
            axes.append(len(knots))
        ms = e.get("ms")
        if not isinstance(ms, list) or len(ms) != axes[0] or not all(isinstance(r, list) and len(r) == axes[1] for r in ms):
            raise HippError(f"{where}: {what}.ms must be a {axes[0]} x {axes[1]} grid")
        for r in ms:
            for v in r:
                _number(v, where, f"{what}.ms entries")
    for key in ("batch", "threads"):
        if not isinstance(p.get(key), int) or isinstance(p.get(key), bool) or p[key] < 1:
            raise HippError(f"{where}: {key} must be a positive whole number, got {p.get(key)!r}")


def parse_bound(text: str, model: LatencyModel | None = None) -> float:
    """--max-latency: a ratio of the dense model in (0, 1] ("0.5"), or milliseconds per batch ("12ms"),
    turned into a ratio with the model's dense prediction."""
    s = str(text).strip().lower()
    try:
        value = float(s[:-2]) if s.endswith("ms") else float(s)
    except ValueError:
        raise HippError(f"--max-latency takes a ratio such as 0.5 or milliseconds such as 12ms, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise HippError(f"--max-latency must be positive, got {text!r}")
    if s.endswith("ms"):
        if model is None:
            raise HippError("a bound in milliseconds needs a latency profile")
        value = value / model.dense_ms["latency"]
    if value > 1:
        raise HippError(f"--max-latency {text} is above the dense model's predicted latency"
                        + (f" ({model.dense_ms['latency']:.2f} ms)" if model is not None else "") + "; nothing to prune")
    return value


def latency_for(space: PruneSpace, path=None, stored: dict | None = None) -> LatencyModel | None:
    """The latency model for a query: the profile file given (--latency-profile), else the one a
    controller stored when it trained with latency (controller.json extra.latency_profile), else None."""
    if path is not None:
        from ..storage.fileio import read_json

        return LatencyModel(read_json(path), space, where=str(path))
    if stored is not None:
        return LatencyModel(stored, space, where="the controller's latency profile")
    return None
