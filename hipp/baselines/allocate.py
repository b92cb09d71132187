"""Baselines' scores -> a hard Plan at a FLOPs ratio, through the project's one budget fitter.

Importance is each method's business; cutting to a budget is hipp.core.budget's, so every method
(and the controller's bound query) is held to one rule (Torch-Pruning style). This module only
turns scores into the fitter's keys: score per FLOP (a greedy knapsack) or the raw score, +inf for
units a method protects, -inf for the units of layers it dropped. The plan lands at or just below
the target.

The FLOPs ratio is over both towers and includes the fixed (non-prunable) costs, as Plan.costs()
reports it. Depth is decided by the methods (they pass `layer_keep`); the allocator only spends
width inside kept layers and, with `drop_empty`, drops a layer left with no head and no channel.
"""
from __future__ import annotations

import math
import torch

from ..core.budget import Units, fit, top_k, top_up
from ..core.gates import topk_mask
from ..errors import HippError
from ..core.plan import Plan
from ..core.space import PruneSpace
from .units import Scores, unit_flops

TOLERANCE = 0.02  # an allocated plan's FLOPs ratio lies in [target - TOLERANCE, target]
KEYS = ("density", "score")
ROUND_OFF = 1e-12  # a baseline's plan may land on its budget exactly (finish() accepts it to 1e-9)


class BudgetError(HippError):
    """The requested FLOPs ratio cannot be met under the method's constraints."""


def check_target(target: float) -> float:
    try:
        t = float(target)
    except (TypeError, ValueError):
        raise HippError(f"a FLOPs budget must be a number, got {target!r}") from None
    if not (math.isfinite(t) and 0 < t <= 1):
        raise HippError(f"a FLOPs budget must be a ratio in (0, 1], got {target!r}")
    return t


def width_budget(space: PruneSpace, target: float, towers=None) -> float:
    """Prunable FLOPs allowed in `towers` (default: every stage) so that their total (fixed costs
    included) is target * dense."""
    towers = space.stages if towers is None else towers
    return target * _dense(space, towers) - sum(space.fixed_flops.get(t, 0.0) for t in towers)


def _dense(space: PruneSpace, towers) -> float:
    dense = space.dense_costs()
    return sum(dense[f"flops/{t}"] for t in towers)


def finish(space: PruneSpace, target: float, layer_keep, head_keep, channel_keep, meta: dict | None,
           tolerance: float = TOLERANCE, drop_empty: bool = True, token_keep=None) -> Plan:
    """Drop emptied layers (optional), build the Plan and hold it to the target window."""
    layer_keep = torch.as_tensor(layer_keep, dtype=torch.float64).clone()
    if drop_empty:
        for i in range(len(space.layers)):
            if head_keep[i].sum() == 0 and channel_keep[i].sum() == 0:
                layer_keep[i] = 0.0  # only two output biases were left: the layer is gone
    plan = Plan(space, layer_keep, head_keep, channel_keep, meta=dict(meta or {}), token_keep=token_keep)
    got = plan.costs()["flops_ratio"]
    if got > target + 1e-9:
        raise BudgetError(f"cannot prune down to a FLOPs ratio of {target:g}: the fixed costs and the units "
                          f"this method must keep already reach {got:.3f}")
    if got < target - tolerance:
        raise BudgetError(f"the plan reaches a FLOPs ratio of only {got:.3f} for a budget of {target:g} "
                          f"(too few layers kept to spend it)")
    plan.meta.update({"budget": target, "flops_ratio": got})
    return plan


def _protected(scores: torch.Tensor, min_keep: float) -> torch.Tensor:
    """0/1 mask of the ceil(min_keep * n) best-scored units of one layer and kind."""
    k = min(len(scores), math.ceil(min_keep * len(scores) - 1e-9)) if min_keep > 0 else 0
    return topk_mask(scores, k)


def fit_keys(space: PruneSpace, target: float, heads, channels, layer_keep, *, per_tower: bool = False,
             layer_budgets=None, top_up_units: bool = True, token_keep=None) -> tuple[Units, torch.Tensor]:
    """Per-unit keys (higher = kept first; +inf = must stay, -inf = must go) -> the effective 0/1
    mask of the one fitter (hipp.core.budget): the largest top-k meeting the FLOPs bound (per
    stage with `per_tower`, per layer with `layer_budgets` in prunable FLOPs), then the top-up; with
    layer budgets a last top-up without them spends what their rounding left over. `token_keep`: the
    token counts of the space's token levels the plan keeps (hipp.core.space; None: all)."""
    units = Units(space, token_keep=token_keep)
    lk = torch.as_tensor(layer_keep, dtype=torch.float64)

    def gone(t: torch.Tensor, i: int) -> torch.Tensor:
        return t.double() if lk[i] else torch.full_like(t.double(), -math.inf)

    flat = torch.cat([torch.where(lk > 0, math.inf, -math.inf).double(),
                      *(gone(h, i) for i, h in enumerate(heads)), *(gone(c, i) for i, c in enumerate(channels))])
    bounds = {f"flops/{t}": target for t in space.stages} if per_tower else {"flops": target}
    layered = dict(bounds)
    if layer_budgets is not None:
        lb = [float(b) for b in torch.as_tensor(layer_budgets, dtype=torch.float64)]
        if len(lb) != len(space.layers):
            raise ValueError(f"layer_budgets has {len(lb)} entries for {len(space.layers)} layers")
        layered.update({f"flops@{i}": b / units.total_flops for i, b in enumerate(lb)})
    found = fit(units, flat, layered)
    if found.k < int(torch.isposinf(flat).sum()):
        mask = top_k(flat, int(torch.isposinf(flat).sum()))
        got = units.measure(units.plan(mask, {}), bounds)
        raise BudgetError(f"cannot prune down to a FLOPs ratio of {target:g}: the fixed costs and the units "
                          f"this method must keep already reach {max(got.values()):.3f}")
    mask = top_k(flat, found.k)
    if top_up_units:
        mask, _ = top_up(units, flat, mask, layered, margin=-ROUND_OFF)
        if layer_budgets is not None:
            mask, _ = top_up(units, flat, mask, bounds, margin=-ROUND_OFF)
    return units, mask


def allocate(space: PruneSpace, target: float, scores: Scores, *, key: str = "density", min_keep: float = 0.0,
             per_tower: bool = False, layer_keep=None, layer_budgets=None, drop_empty: bool = True,
             tolerance: float = TOLERANCE, meta: dict | None = None) -> Plan:
    """A hard plan whose FLOPs ratio lies in [target - tolerance, target].

    key:           "density" ranks units by score / FLOPs (greedy knapsack; scores must be >= 0),
                   "score" by the raw score (any sign; for methods whose scores are already comparable).
    min_keep:      every kept layer keeps at least ceil(min_keep * n) of its best heads and of its
                   best channel groups (avoids layer collapse).
    per_tower:     each tower meets the ratio on its own (no modality can be starved by the other).
    layer_keep:    [L] 0/1: layers the method dropped; their units are never spent on.
    layer_budgets: [L] prunable FLOPs per layer: each layer is held to its own budget, then a last
                   top-up settles what rounding left over.
    """
    target = check_target(target)
    if key not in KEYS:
        raise ValueError(f"unknown allocation key {key!r}")
    scores = scores.check(space)
    lk = torch.ones(len(space.layers), dtype=torch.float64) if layer_keep is None else \
        torch.as_tensor(layer_keep, dtype=torch.float64).clone()
    h_cost, c_cost = unit_flops(space)
    keyed = []
    for s, cost in ((scores.heads, h_cost), (scores.channels, c_cost)):
        if key == "density" and any(bool((x < 0).any()) for x in s):
            raise ValueError("density allocation needs scores >= 0")
        k = [x / c if key == "density" else x.clone() for x, c in zip(s, cost)]
        keyed.append([torch.where(_protected(x, min_keep) > 0, math.inf, v) for x, v in zip(s, k)])
    units, mask = fit_keys(space, target, *keyed, lk, per_tower=per_tower, layer_budgets=layer_budgets)
    plan = units.plan(mask, {})
    info = {"key": key, "min_keep": min_keep, "per_tower": per_tower}
    return finish(space, target, plan.layer_keep, plan.head_keep, plan.channel_keep, {**info, **(meta or {})},
                  tolerance, drop_empty)


def uniform(space: PruneSpace, target: float, scores: Scores, tolerance: float = TOLERANCE,
            meta: dict | None = None, token_keep=None) -> Plan:
    """Every layer keeps the same share of its heads and of its channel groups (the best by `scores`).

    A unit's key is minus its rank within its layer and kind as a share of their number, so the
    fitter's top-k keeps the same share everywhere; ties across layers go in layer order, so layers
    differ by at most one unit of each kind. No top-up: it would spend the rest unevenly.
    """
    target = check_target(target)
    scores = scores.check(space)

    def share(s: torch.Tensor) -> torch.Tensor:
        rank = torch.empty(len(s), dtype=torch.float64)
        rank[torch.sort(s, descending=True, stable=True).indices] = torch.arange(len(s), dtype=torch.float64)
        return -(rank + 0.5) / len(s)

    units, mask = fit_keys(space, target, [share(h) for h in scores.heads], [share(c) for c in scores.channels],
                           torch.ones(len(space.layers)), top_up_units=False, token_keep=token_keep)
    plan = units.plan(mask, {})
    return finish(space, target, plan.layer_keep, plan.head_keep, plan.channel_keep, {"key": "uniform", **(meta or {})},
                  tolerance, token_keep=token_keep)
