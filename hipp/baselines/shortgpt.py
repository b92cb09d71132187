"""ShortGPT-style layer removal by block influence.

A block's influence is how much it turns the hidden state: 1 - cos(input, output), averaged over
the calibration tokens (activations.BlockStats.influence). Layers leave in order of least
influence (over both stages, each keeping at least one layer) while the plan stays at or above the
FLOPs target; depth alone rarely lands on a budget, so the width left over is then cut by weight
magnitude inside the kept layers, as the magnitude baseline does.
"""
from __future__ import annotations

import torch

from ..core.plan import Plan
from .allocate import allocate
from .method import Context
from .multiflow import activations
from .simple import MIN_KEEP, magnitudes


def depth_keep(ctx: Context, budget: float, influence: torch.Tensor) -> torch.Tensor:
    """[L] 0/1: the least influential layers dropped while the FLOPs ratio stays >= budget."""
    space = ctx.space
    flops = lambda c: sum(float(v) for k, v in c.items() if k.startswith("flops/"))  # noqa: E731
    dense = flops(space.dense_costs())
    _, heads, channels = space.all_kept()
    keep = torch.ones(len(space.layers), dtype=torch.float64)
    for i in torch.argsort(influence, stable=True).tolist():
        tower = space.layers[i].tower
        if sum(keep[j] for j, l in enumerate(space.layers) if l.tower == tower) <= 1:
            continue
        trial = keep.clone()
        trial[i] = 0.0
        if flops(space.costs(trial, heads, channels)) < budget * dense:
            continue
        keep = trial
    return keep


def shortgpt_plan(ctx: Context, budget: float) -> Plan:
    influence = ctx.cached("influence", lambda: torch.tensor([s.influence for s in activations(ctx)],
                                                              dtype=torch.float64))
    keep = depth_keep(ctx, budget, influence)
    plan = allocate(ctx.space, budget, magnitudes(ctx), min_keep=MIN_KEEP, layer_keep=keep)
    plan.meta.update({"block_influence": influence.tolist(), "layers_dropped": int((keep == 0).sum())})
    return plan
