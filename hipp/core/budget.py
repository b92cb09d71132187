"""Fitting a plan to a cost bound: the largest top-k of the units' logits that meets the bound
(a binary search, since cost only grows with k), then a top-up with the highest-logit units that
still fit. The bound query fits every candidate preference with it, and polishing fits its gates.
Without data, `sweep_within` picks among the controller's own plans along a preference sweep.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import HippError
from .gates import couple
from .plan import Plan
from .preference import COSTS, sweep
from .space import PruneSpace

MARGIN = 1e-9  # the top-up stays this far inside the bound, so float round-off never crosses it


def check_bounds(max_flops: float | None, max_params: float | None) -> dict[str, float]:
    bounds = {k: v for k, v in (("flops", max_flops), ("params", max_params)) if v is not None}
    if not bounds:
        raise HippError("give max_flops and/or max_params")
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
    with what each unit adds to the FLOPs / params ratios when its layer is kept (PruneSpace.costs terms)."""

    def __init__(self, space: PruneSpace):
        self.space = space
        dense = space.dense_costs()
        df = sum(dense[f"flops/{t}"] for t in space.stages)
        dp = sum(dense[f"params/{t}"] for t in space.stages)
        L = len(space.layers)
        self.sizes = [L] + [l.num_heads for l in space.layers] + [l.num_channel_gates for l in space.layers]
        self.kind, self.layer, self.dflops, self.dparams = [], [], [], []

        def add(kind: str, i: int, flops: float, params: float) -> None:
            self.kind.append(kind)
            self.layer.append(i)
            self.dflops.append(flops / df)
            self.dparams.append(params / dp)

        for i, l in enumerate(space.layers):
            add("layer", i, 0.0, l.layer_params)
        for i, l in enumerate(space.layers):
            for _ in range(l.num_heads):
                add("head", i, l.head_flops, l.head_params)
        for i, l in enumerate(space.layers):
            for size in l.channel_sizes().tolist():
                add("channel", i, size * l.channel_flops, size * l.channel_params)

    def flat(self, logits) -> torch.Tensor:
        layer, heads, chans = logits
        return torch.cat([layer, *heads, *chans]).double()

    def plan(self, mask: torch.Tensor, preference: dict, meta: dict | None = None) -> Plan:
        """A flat 0/1 mask -> a Plan (the hierarchy applied: heads of a dropped layer do not count)."""
        parts = list(mask.double().split(self.sizes))
        L = len(self.space.layers)
        gates = couple((parts[0], parts[1:1 + L], parts[1 + L:]))
        return Plan.from_gates(self.space, gates, preference, meta)


def ratios(plan: Plan) -> dict[str, float]:
    c = plan.costs()
    return {"flops": c["flops_ratio"], "params": c["params_ratio"]}


def meets(r: dict, bounds: dict) -> bool:
    return all(r[k] <= v for k, v in bounds.items())


@dataclass
class Fit:
    index: int        # candidate preference row
    k: int            # its top-k highest-logit units are kept
    offset: float     # the global logit offset that keeps exactly those (closest to 0)
    key: bytes        # identity of the resulting plan


def fit(units: Units, flat: torch.Tensor, bounds: dict, index: int) -> Fit:
    order = torch.sort(flat, descending=True, stable=True).indices
    n = len(flat)

    def mask(k: int) -> torch.Tensor:
        m = torch.zeros(n, dtype=torch.float64)
        m[order[:k]] = 1.0
        return m

    lo, hi = 0, n  # cost grows with k (nested sets), so binary-search the largest feasible k
    if not meets(ratios(units.plan(mask(0), {})), bounds):
        return Fit(index, -1, math.inf, b"")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if meets(ratios(units.plan(mask(mid), {})), bounds):
            lo = mid
        else:
            hi = mid - 1
    vals = flat[order]
    # logit + offset > 0 keeps exactly the first k units for offset in (-vals[k-1], -vals[k]]
    low = -float(vals[lo - 1]) if lo > 0 else -math.inf
    high = -float(vals[lo]) if lo < n else math.inf
    offset = 0.0 if low < 0 <= high else (high if high < 0 else low)
    return Fit(index, lo, offset, units.plan(mask(lo), {}).mask_key())


def top_up(units: Units, flat: torch.Tensor, k: int, bounds: dict) -> tuple[torch.Tensor, int]:
    """From the top-k plan, add the highest-logit units that still fit, one at a time.

    Works on the *effective* (hierarchy-applied) mask: a layer added here starts with no heads or
    channels (its own cost is only norms and biases), and a second pass reaches the units of layers
    added during the first one.
    """
    order = torch.sort(flat, descending=True, stable=True).indices.tolist()
    plan = units.plan(torch.zeros(len(flat)).index_fill_(0, torch.tensor(order[:k], dtype=torch.long), 1.0)
                      if k > 0 else torch.zeros(len(flat)), {})
    eff = torch.cat([plan.layer_keep, *plan.head_keep, *plan.channel_keep]).tolist()
    cur = ratios(plan)
    room = {key: bounds.get(key, math.inf) - MARGIN for key in COSTS}
    added = 0
    for _ in range(2):
        for u in order:
            if eff[u]:
                continue
            layer = units.layer[u]
            if units.kind[u] != "layer" and not eff[layer]:
                continue
            f, p = cur["flops"] + units.dflops[u], cur["params"] + units.dparams[u]
            if f <= room["flops"] and p <= room["params"]:
                eff[u], cur["flops"], cur["params"] = 1.0, f, p
                added += 1
    return torch.tensor(eff, dtype=torch.float64), added
