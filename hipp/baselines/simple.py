"""Data-free baselines: uniform, random and global magnitude.

- uniform:   every layer keeps the same share of heads and channels, the largest by magnitude;
- random:    units leave in a random order (one plan per seed; evaluations average seeds);
- magnitude: global ranking by L1 magnitude per FLOP, each layer keeping at least MIN_KEEP of its
             heads and channels so that no layer collapses.
"""
from __future__ import annotations

import torch

from ..core.plan import Plan
from .allocate import allocate, uniform
from .magnitude import magnitude_scores
from .method import Context
from .units import Scores

MIN_KEEP = 0.1


def magnitudes(ctx: Context) -> Scores:
    return ctx.cached("magnitude", lambda: magnitude_scores(ctx.model, ctx.space))


def uniform_plan(ctx: Context, budget: float) -> Plan:
    return uniform(ctx.space, budget, magnitudes(ctx))


def random_scores(ctx: Context) -> Scores:
    g = torch.Generator().manual_seed(ctx.seed)
    return Scores([torch.rand(l.num_heads, generator=g, dtype=torch.float64) for l in ctx.space.layers],
                  [torch.rand(l.num_channel_gates, generator=g, dtype=torch.float64) for l in ctx.space.layers])


def random_plan(ctx: Context, budget: float) -> Plan:
    # key "score": the removal order is uniform over units, whatever they cost
    return allocate(ctx.space, budget, ctx.cached(("random", ctx.seed), lambda: random_scores(ctx)), key="score")


def magnitude_plan(ctx: Context, budget: float) -> Plan:
    return allocate(ctx.space, budget, magnitudes(ctx), min_keep=MIN_KEEP)
