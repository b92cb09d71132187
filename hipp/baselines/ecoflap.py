"""ECoFLaP-style coarse-to-fine pruning: forward-only block importance sets per-layer budgets,
weight magnitude decides inside each layer.

Coarse: a layer's importance is the calibration damage when its layer gate is zeroed (a
zeroth-order estimate: forward passes only, no gradients). Each layer gets a keep share
proportional to importance ** ALPHA (ALPHA < 1 softens the spread), clipped to [MIN_SHARE, 1] and
scaled so that the layer budgets add up to the FLOPs target. Fine: inside each layer the units
with the least L1 magnitude per FLOP go first, down to the layer's budget.
"""
from __future__ import annotations

import torch

from ..core.plan import Plan
from ..core.space import PruneSpace
from .allocate import allocate, width_budget
from .calibration import Damage
from .method import Context
from .simple import magnitudes
from .units import unit_flops

ALPHA = 0.5
MIN_SHARE = 0.1


@torch.no_grad()
def layer_importance(damage: Damage, space: PruneSpace) -> torch.Tensor:
    out = torch.zeros(len(space.layers), dtype=torch.float64)
    base = damage()
    for i, l in enumerate(space.layers):
        lk, heads, chans = space.all_kept()
        lk[i] = 0.0
        out[i] = max(float(damage.ablate(l.tower, [(lk, heads, chans)], start=l.index)[0]) - base, 0.0)
    return out


def layer_budgets(space: PruneSpace, target: float, importance: torch.Tensor, alpha: float = ALPHA,
                  min_share: float = MIN_SHARE) -> torch.Tensor:
    """Prunable FLOPs per layer: shares ~ importance ** alpha, clipped, summing to the target's budget."""
    h_cost, c_cost = unit_flops(space)
    dense = torch.tensor([float(h.sum() + c.sum()) for h, c in zip(h_cost, c_cost)], dtype=torch.float64)
    total = width_budget(space, target)
    imp = importance.double().clamp_min(1e-12)
    weight = (imp / imp.mean()) ** alpha

    def spent(c: float) -> float:
        return float((weight * c).clamp(min_share, 1.0) @ dense)

    lo, hi = 0.0, 1.0
    while spent(hi) < total and hi < 1e12:
        hi *= 2
    for _ in range(100):  # bisection on the scale: spent() is monotone in it
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if spent(mid) < total else (lo, mid)
    return (weight * hi).clamp(min_share, 1.0) * dense


def ecoflap_plan(ctx: Context, budget: float) -> Plan:
    importance = ctx.cached("layer_importance", lambda: layer_importance(ctx.damage(), ctx.space))
    plan = allocate(ctx.space, budget, magnitudes(ctx), layer_budgets=layer_budgets(ctx.space, budget, importance))
    plan.meta["layer_importance"] = importance.tolist()
    return plan
