"""The one budget fitter: from a key per unit (higher = kept first), the largest top-k that meets
the bounds (a binary search, since cost only grows with k), then a top-up with the highest-key
units that still fit. The bound query fits every candidate preference's logits with it, polishing
fits its gates, and the baselines fit their importance scores (hipp.baselines.allocate).

Bounds are ratios of the dense model: "flops" and "params" over every stage, "flops/<stage>" for one
stage, "flops@<i>" for the width units of layer i (as a share of the whole model's FLOPs), and, with a
latency model (hipp/core/latency.py), "latency" and "latency/<measure>". A key of -inf marks a unit
that must stay out (the top-up never adds it).
Without data, `sweep_within` picks among the controller's own plans along a preference sweep.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import HippError
from .gates import couple
from .plan import Plan
from .preference import sweep
from .space import PruneSpace

MARGIN = 1e-9  # the top-up stays this far inside the bound, so float round-off never crosses it


def check_bounds(max_flops: float | None, max_params: float | None, max_latency: float | None = None) -> dict[str, float]:
    bounds = {k: v for k, v in (("flops", max_flops), ("params", max_params), ("latency", max_latency))
              if v is not None}
    if not bounds:
        raise HippError("give max_flops, max_params and/or max_latency")
    for k, v in bounds.items():
        if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= 1):
            raise HippError(f"max_{k} must be a ratio in (0, 1], got {v}")
    return {k: float(v) for k, v in bounds.items()}


def sweep_within(controller, bounds: dict[str, float], points: int = 101) -> Plan:
    """The least-pruned plan meeting `bounds` (check_bounds) among the controller's plans for
    preferences swept from utility toward the bounded cost: no data, no fitting of the logits."""
    names = controller.objective_names
    for k in bounds:
        if k not in names:
            raise HippError(f"this controller has no {k!r} objective; it knows {', '.join(names)}")
    target = "flops" if "flops" in bounds else "params"
    first = "utility" if "utility" in names else names[0]
    if first == target:
        raise HippError(f"cannot sweep toward {target!r}: it is the controller's only objective")
    # sweep order: ties keep the plan with the most utility weight
    candidates = [(p, ratios(p)) for p in map(controller.plan, sweep(names, first, target, points))]
    feasible = [(p, r) for p, r in candidates if meets(r, bounds)]
    best = max(feasible, key=lambda pr: pr[1][target], default=(None, None))[0]
    if best is None:
        got = min(candidates, key=lambda pr: pr[1][target])[1]
        reached = ", ".join(f"{k}_ratio {got[k]:.3f}" for k in bounds)
        raise HippError(f"no preference from {first} to {target} meets the budget "
                        f"({', '.join(f'max_{k}={v:g}' for k, v in bounds.items())}); the cheapest plan "
                        f"reaches {reached}")
    best.meta.update({f"max_{k}": v for k, v in bounds.items()})
    return best


class Units:
    """Every gate of a space as one flat vector: layers, then each layer's heads, then channel groups,
    with what each unit adds to the FLOPs / params ratios when its layer is kept (PruneSpace.costs terms).
    Latency is not a sum of fixed terms per unit; `latency` (a LatencyModel) prices it per layer."""

    def __init__(self, space: PruneSpace, latency=None, token_keep=None):
        """`token_keep`: the token counts every plan built here keeps (None: all), which set the units'
        FLOPs; ratios stay those of the dense model with every token."""
        if token_keep is not None and latency is not None:
            raise HippError("a latency bound does not price visual tokens yet; bound FLOPs or params instead")
        self.space, self.latency = space, latency
        self.token_keep = None if token_keep is None else torch.as_tensor(token_keep, dtype=torch.float64)
        at = [(float(h), float(c)) for h, c in space.unit_flops(self.token_keep)]
        dense = space.dense_costs()
        df = sum(dense[f"flops/{t}"] for t in space.stages)
        dp = sum(dense[f"params/{t}"] for t in space.stages)
        L = len(space.layers)
        self.total_flops = df
        self.stage_flops = {t: dense[f"flops/{t}"] for t in space.stages}
        self.sizes = [L] + [l.num_heads for l in space.layers] + [l.num_channel_gates for l in space.layers]
        self.kind, self.layer, self.dflops, self.dparams, self.flops = [], [], [], [], []
        self.size = []  # attention units or MLP channels a unit holds (0 for a layer)

        def add(kind: str, i: int, flops: float, params: float, size: float = 0.0) -> None:
            self.kind.append(kind)
            self.layer.append(i)
            self.size.append(size)
            self.flops.append(flops)
            self.dflops.append(flops / df)
            self.dparams.append(params / dp)

        for i, l in enumerate(space.layers):
            add("layer", i, 0.0, l.layer_params)
        for i, l in enumerate(space.layers):
            for _ in range(l.num_heads):
                add("head", i, at[i][0], l.head_params, 1.0)
        for i, l in enumerate(space.layers):
            for size in l.channel_sizes().tolist():
                add("channel", i, size * at[i][1], size * l.channel_params, size)

    def delta(self, key: str) -> list[float]:
        """What each unit adds to the ratio `key` (see the module docstring) when its layer is kept."""
        if key == "flops":
            return self.dflops
        if key == "params":
            return self.dparams
        if key.startswith("flops/") and key[6:] in self.stage_flops:
            t = key[6:]
            return [f / self.stage_flops[t] if self.space.layers[i].tower == t else 0.0
                    for f, i in zip(self.flops, self.layer)]
        if key.startswith("flops@"):
            i = int(key[6:])
            return [f if j == i else 0.0 for f, j in zip(self.dflops, self.layer)]
        if key.startswith("latency"):
            raise HippError("latency has no fixed share per unit (Units.tracker prices it)")
        raise HippError(f"unknown bound {key!r}")

    def check_keys(self, keys) -> None:
        if any(k.startswith("latency") for k in keys):
            if self.latency is None:
                raise HippError("a latency bound needs a latency profile (hipp profile; --latency-profile FILE)")
            unknown = [k for k in keys if k.startswith("latency") and k not in self.latency.bound_keys()]
            if unknown:
                raise HippError(f"unknown latency bound {unknown[0]!r}; this profile has "
                                f"{', '.join(self.latency.bound_keys())}")

    def tracker(self, eff: list[float]):
        return self.latency.tracker(eff, self.size, self.layer, self.kind)

    def measure(self, plan: Plan, keys) -> dict[str, float]:
        """The plan's ratio for each bound key: totals and stages from its exact costs, layers by sum."""
        c = plan.costs()
        eff = torch.cat([plan.layer_keep, *plan.head_keep, *plan.channel_keep]).tolist()
        lat = None
        out = {}
        for key in keys:
            if key.startswith("latency"):
                self.check_keys([key])
                lat = lat or {k: float(v) for k, v in self.latency.ratios(*plan.gates).items()}
                out[key] = lat[key]
            elif key in ("flops", "params"):
                out[key] = c[f"{key}_ratio"]
            elif key.startswith("flops/"):
                out[key] = c[f"flops_ratio/{key[6:]}"]
            else:
                out[key] = sum(d * e for d, e in zip(self.delta(key), eff))
        return out

    def flat(self, logits) -> torch.Tensor:
        layer, heads, chans = logits
        return torch.cat([layer, *heads, *chans]).double()

    def plan(self, mask: torch.Tensor, preference: dict, meta: dict | None = None) -> Plan:
        """A flat 0/1 mask -> a Plan (the hierarchy applied: heads of a dropped layer do not count)."""
        parts = list(mask.double().split(self.sizes))
        L = len(self.space.layers)
        gates = couple((parts[0], parts[1:1 + L], parts[1 + L:]))
        return Plan.from_gates(self.space, gates, preference, meta, self.token_keep)


def ratios(plan: Plan, latency=None) -> dict[str, float]:
    c = plan.costs()
    out = {"flops": c["flops_ratio"], "params": c["params_ratio"]}
    if latency is not None:
        out.update({k: float(v) for k, v in latency.ratios(*plan.gates).items()})
    return out


def meets(r: dict, bounds: dict) -> bool:
    return all(r[k] <= v for k, v in bounds.items())


@dataclass
class Fit:
    index: int        # candidate preference row
    k: int            # its top-k highest-logit units are kept
    offset: float     # the global logit offset that keeps exactly those (closest to 0)
    key: bytes        # identity of the resulting plan


def top_k(flat: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask of the k highest keys (ties: the first in unit order)."""
    m = torch.zeros(len(flat), dtype=torch.float64)
    m[torch.sort(flat, descending=True, stable=True).indices[:k]] = 1.0
    return m


def fit(units: Units, flat: torch.Tensor, bounds: dict, index: int = 0) -> Fit:
    n = len(flat)

    def fits(k: int) -> bool:
        return meets(units.measure(units.plan(top_k(flat, k), {}), bounds), bounds)

    order = torch.sort(flat, descending=True, stable=True).indices

    lo, hi = 0, n  # cost grows with k (nested sets), so binary-search the largest feasible k
    if not fits(0):
        return Fit(index, -1, math.inf, b"")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    vals = flat[order]
    # logit + offset > 0 keeps exactly the first k units for offset in (-vals[k-1], -vals[k]]
    low = -float(vals[lo - 1]) if lo > 0 else -math.inf
    high = -float(vals[lo]) if lo < n else math.inf
    offset = 0.0 if low < 0 <= high else (high if high < 0 else low)
    return Fit(index, lo, offset, units.plan(top_k(flat, lo), {}).mask_key())


def check_possible(units: Units, found: Fit, bounds: dict) -> None:
    """One clear line when even the plan with no layer at all is over the bound (`found` = its fit)."""
    if found.k >= 0:
        return
    least = units.measure(units.plan(torch.zeros(sum(units.sizes)), {}), bounds)
    raise HippError(f"no plan meets {', '.join(f'max_{k}={v:g}' for k, v in bounds.items())}: the smallest "
                    f"possible plan (every layer dropped) has {', '.join(f'{k}_ratio {least[k]:.4f}' for k in bounds)}")


def top_up(units: Units, flat: torch.Tensor, start: int | torch.Tensor, bounds: dict,
           margin: float = MARGIN) -> tuple[torch.Tensor, int]:
    """From the top-k plan (or a given mask), add the highest-key units that still fit, one at a time.

    Works on the *effective* (hierarchy-applied) mask: a layer added here starts with no heads or
    channels (its own cost is only norms and biases), and a second pass reaches the units of layers
    added during the first one. Units keyed -inf are never added. `margin` < 0 lets a sum land on
    the bound itself (within round-off), for callers whose plans are checked against it exactly.
    """
    order = torch.sort(flat, descending=True, stable=True).indices.tolist()
    start = top_k(flat, start) if isinstance(start, int) else start
    plan = units.plan(start, {})
    eff = torch.cat([plan.layer_keep, *plan.head_keep, *plan.channel_keep]).tolist()
    keys = sorted(bounds)
    units.check_keys(keys)
    cur = units.measure(plan, keys)
    room = {key: bounds[key] - margin for key in keys}
    timed = [key for key in keys if key.startswith("latency")]
    deltas = {key: units.delta(key) for key in keys if key not in timed}
    tracker = units.tracker(eff) if timed else None
    added = 0
    for _ in range(2):
        for u in order:
            if eff[u] or flat[u] == -math.inf:
                continue
            layer = units.layer[u]
            if units.kind[u] != "layer" and not eff[layer]:
                continue
            new = {key: cur[key] + d[u] for key, d in deltas.items()}
            if tracker is not None:
                after = tracker.after(u)
                new.update({key: after[key] for key in timed})
            if all(new[key] <= room[key] for key in keys):
                eff[u], cur = 1.0, new
                if tracker is not None:
                    tracker.add(u)
                added += 1
    return torch.tensor(eff, dtype=torch.float64), added
