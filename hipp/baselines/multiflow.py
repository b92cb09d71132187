"""MULTIFLOW-style importance: weight magnitude times the saliency of the neurons it connects.

A weight w from neuron i to neuron o carries |w| * a_i * a_o of "information flow", with a the
activation norm of each neuron on calibration data. A unit's score sums the flow through every
weight it owns: a head's q/k/v rows (from the block input to its projections) and out_proj
columns (from its outputs to the branch output); a channel's c_fc row and c_proj column. Sparsity
is spread per modality: each tower meets the FLOPs ratio on its own, so neither collapses.
"""
from __future__ import annotations

import torch

from ..backends import prunable_blocks
from ..core.plan import Plan
from ..core.space import PruneSpace
from .activations import BlockStats, activation_stats
from .allocate import allocate
from .method import Context
from .units import Scores, group_sum, head_sum


@torch.no_grad()
def multiflow_scores(model, space: PruneSpace, stats: list[BlockStats]) -> Scores:
    heads, channels = [], []
    for block, spec, s in zip(prunable_blocks(model), space.layers, stats):
        attn, mlp = block.attn, block.mlp
        w_in = attn.qkv_weight.detach().double().abs()        # [3 * H * hd, d]
        w_out = attn.out_proj.weight.detach().double().abs()      # [d, H * hd]
        flow_in = (w_in @ s["attn_in"].rms) * s["qkv"].rms         # per q/k/v row
        flow_out = (w_out.T @ s["attn_out"].rms) * s["head_out"].rms  # per head-output dimension
        heads.append(head_sum(flow_in.view(3, -1), spec) + head_sum(flow_out, spec))
        w_fc = mlp.fc_in.weight.detach().double().abs()            # [hidden, d]
        w_proj = mlp.fc_out.weight.detach().double().abs()        # [d, hidden]
        hidden = s["hidden"].rms
        channels.append(group_sum((w_fc @ s["mlp_in"].rms) * hidden + (w_proj.T @ s["mlp_out"].rms) * hidden, spec))
    return Scores(heads, channels)


def activations(ctx: Context) -> list[BlockStats]:
    return ctx.cached("activations", lambda: activation_stats(ctx.model, ctx.calibration))


def multiflow_plan(ctx: Context, budget: float) -> Plan:
    scores = ctx.cached("multiflow", lambda: multiflow_scores(ctx.model, ctx.space, activations(ctx)))
    return allocate(ctx.space, budget, scores, per_tower=True)
