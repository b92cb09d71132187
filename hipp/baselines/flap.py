"""FLAP-style importance: fluctuation of each unit's input to the output projection times its weight norm.

For an MLP channel j: Var(h_j) * ||c_proj[:, j]||^2, the variance of its activation over
calibration tokens times the energy of the column it writes with; a head sums the same over its
out_proj input dimensions. Scores are standardised per layer and kind (zero mean, unit spread),
which makes them comparable across layers, and units are then removed globally by standardised
score (one structure over both towers). Removed units' mean output is folded into the output
biases when the plan is evaluated (Method.compensate -> hipp.export.slicing.compensate_bias), so an
emptied branch is kept as a bias rather than its layer dropped. A LLaVA's plan is measured without
compensation (hipp.evaluation.generative_bench): its Llama-shaped o_proj / down_proj have no bias.
"""
from __future__ import annotations

import torch

from ..backends import prunable_blocks
from ..core.plan import Plan
from ..core.space import PruneSpace
from .activations import BlockStats
from .allocate import allocate
from .method import Context
from .multiflow import activations
from .units import Scores, group_sum, head_sum


def standardize(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std within one layer and kind; a single unit or a flat layer scores 0."""
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    return (x - x.mean()) / std if std > 0 else torch.zeros_like(x)


@torch.no_grad()
def flap_scores(model, space: PruneSpace, stats: list[BlockStats]) -> Scores:
    heads, channels = [], []
    for block, spec, s in zip(prunable_blocks(model), space.layers, stats):
        w_out = block.attn.out_layer.weight.detach().double().pow(2).sum(0)  # [H * hd]
        w_proj = block.mlp.fc_out.weight.detach().double().pow(2).sum(0)     # [hidden]
        heads.append(standardize(head_sum(s["head_out"].var * w_out, spec)))
        channels.append(standardize(group_sum(s["hidden"].var * w_proj, spec)))
    return Scores(heads, channels)


def flap_plan(ctx: Context, budget: float) -> Plan:
    scores = ctx.cached("flap", lambda: flap_scores(ctx.model, ctx.space, activations(ctx)))
    return allocate(ctx.space, budget, scores, key="score", drop_empty=False)
