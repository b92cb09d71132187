"""Token pruning inside a CLIP-style image tower (EViT-style): after layer K, only the class token and
the k patches it attended to most in layer K go on to the later layers.

The ranking is token_rank's (the class token's attention row in layer K, summed over the heads the
plan keeps there; evenly spaced patches when the plan leaves layer K no attention). A forward hook
on block K gathers the kept positions from its output, in their original order, so every later block,
and the tower's pooling of the class token, run on 1 + k positions. The hook object travels with a
deep copy of the model; `remove` finds it by its class, so no handle can point at another model.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.space import TokenLevel
from ..errors import HippError
from .base import backend_for
from .token_rank import VisualTokens, choose, recorded, record_from, row_flops, scores_of


def default_after(layers: int) -> int:
    """EViT's first reduction comes after a quarter of ViT-B's 12 layers (layer index 3)."""
    return max(0, layers // 4)


def level(stage: str, blocks: nn.ModuleList, positions: int, after: int, head_dim: int) -> TokenLevel:
    """The token level of an image tower with `positions` tokens (the class token first): patches are
    kept after block `after`, ranked by its class-token row (2 * head_dim * positions FLOPs per head)."""
    if not 0 <= after < len(blocks) - 1:
        raise HippError(f"tokens can be pruned after image layer 0 to {len(blocks) - 2}, not {after}")
    return TokenLevel(stage, positions - 1, after=after, rule="cls", rank_stage=stage, rank_layer=after,
                      rank_flops=row_flops(1, head_dim, positions))


class KeepTokens:
    """The forward pre-hook and hook of block K: record the class-token row, then keep 1 + k positions."""

    def __init__(self, spec: VisualTokens):
        self.spec = spec

    def before(self, block: nn.Module, args) -> None:
        record_from(block)

    def after(self, block: nn.Module, args, output):
        attn, rows = recorded(block)
        x = output[0] if isinstance(output, tuple) else output
        if x.shape[1] != self.spec.of + 1:
            raise HippError(f"image layer {self.spec.layer} gives {x.shape[1] - 1} patches; the token budget is "
                            f"for {self.spec.of}")
        scores = scores_of(rows, attn)[:, 1:] if rows else None
        idx = choose(scores, x.shape[0], self.spec.of, self.spec.kept, x.device) + 1
        idx = torch.cat([torch.zeros_like(idx[:, :1]), idx], dim=1)  # the class token always stays
        kept = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return (kept, *output[1:]) if isinstance(output, tuple) else kept


def _block(model: nn.Module, spec: VisualTokens) -> nn.Module:
    blocks = backend_for(model).blocks(model).get(spec.stage)
    if blocks is None or not 0 <= spec.layer < len(blocks):
        raise HippError(f"the model has no {spec.stage} layer {spec.layer} to prune tokens after")
    return blocks[spec.layer]


def attach(model: nn.Module, spec: VisualTokens) -> None:
    block, hook = _block(model, spec), KeepTokens(spec)
    block.register_forward_pre_hook(hook.before)
    block.register_forward_hook(hook.after)


def remove(model: nn.Module) -> None:
    """Take every KeepTokens hook off the model's blocks."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, fn in hooks.items() if isinstance(getattr(fn, "__self__", None), KeepTokens)]:
                del hooks[key]
