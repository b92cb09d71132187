"""Weight magnitude of every unit: the L1 norm of the weights that exist only for it.

A head owns its q, k, v rows of in_proj and its columns of out_proj; an MLP channel owns its row
of c_fc and its column of c_proj. The allocator divides by FLOPs, so a unit's score per FLOP is
(roughly) its mean |w| over the tokens it is applied to.
"""
from __future__ import annotations

import torch

from ..backends import prunable_blocks
from ..core.space import PruneSpace
from .units import Scores, group_sum, head_sum


@torch.no_grad()
def magnitude_scores(model, space: PruneSpace) -> Scores:
    heads, channels = [], []
    for block, spec in zip(prunable_blocks(model), space.layers):
        attn, mlp = block.attn, block.mlp
        d = attn.embed_dim
        w_in = attn.qkv_weight.abs().view(3, spec.num_heads * spec.head_dim, d).sum((0, 2))
        w_out = attn.out_proj.weight.abs().sum(0)
        heads.append(head_sum(w_in + w_out, spec))
        channels.append(group_sum(mlp.fc_in.weight.abs().sum(1) + mlp.fc_out.weight.abs().sum(0), spec))
    return Scores(heads, channels)
