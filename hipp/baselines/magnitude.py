"""Weight magnitude of every unit: the L1 norm of the weights that exist only for it.

Each gated module says which weights a unit owns (`owned_l1`): a head its q, k, v rows of in_proj
and its columns of out_proj (a key/value group: its k, v rows and its query heads' q rows and out
columns); an MLP channel its row of c_fc (of gate and up under SwiGLU) and its column of c_proj.
The allocator divides by FLOPs, so a unit's score per FLOP is (roughly) its mean |w| over the
tokens it is applied to.
"""
from __future__ import annotations

from ..backends import prunable_blocks
from ..core.space import PruneSpace
from .units import Scores, group_sum


def magnitude_scores(model, space: PruneSpace) -> Scores:
    blocks = list(zip(prunable_blocks(model), space.layers))
    return Scores([block.attn.owned_l1() for block, _ in blocks],
                  [group_sum(block.mlp.owned_l1(), spec) for block, spec in blocks])
