"""Per-unit quantities over a prune space: importance scores and FLOPs of every head and channel group.

Units are what a plan keeps or drops inside a layer: attention heads and MLP channel groups (the
space's `channel_group` consecutive hidden channels share one gate). Scores are "higher = more
important"; what they mean is each method's business.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.space import LayerSpec, PruneSpace


@dataclass
class Scores:
    heads: list[torch.Tensor]     # per layer [num_heads]
    channels: list[torch.Tensor]  # per layer [num_channel_gates]

    def check(self, space: PruneSpace) -> Scores:
        """Shapes against the space, finite values, float64 on the CPU (ValueError: a method's bug)."""
        n = len(space.layers)
        if len(self.heads) != n or len(self.channels) != n:
            raise ValueError(f"scores cover {len(self.heads)}/{len(self.channels)} layers, the space has {n}")
        heads, channels = [], []
        for i, spec in enumerate(space.layers):
            h = torch.as_tensor(self.heads[i]).detach().double().cpu().flatten()
            c = torch.as_tensor(self.channels[i]).detach().double().cpu().flatten()
            if h.numel() != spec.num_heads or c.numel() != spec.num_channel_gates:
                raise ValueError(f"layer {i}: {h.numel()} head / {c.numel()} channel scores for "
                                 f"{spec.num_heads} heads / {spec.num_channel_gates} channel gates")
            if not (torch.isfinite(h).all() and torch.isfinite(c).all()):
                raise ValueError(f"layer {i}: scores must be finite")
            heads.append(h)
            channels.append(c)
        return Scores(heads, channels)


def group_sum(per_channel: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """[mlp_hidden] per-channel values -> [num_channel_gates] sums (the last group may be short)."""
    x = per_channel.detach().double().flatten()
    pad = spec.num_channel_gates * spec.channel_group - spec.mlp_hidden
    return torch.cat([x, x.new_zeros(pad)]).view(spec.num_channel_gates, spec.channel_group).sum(1)


def head_sum(per_dim: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """[..., query heads * head_dim] per-dimension values (any leading dims) -> [num_heads] sums, one per
    attention unit (a key/value group's query heads are consecutive)."""
    x = per_dim.detach().double()
    return x.reshape(-1, spec.num_heads, spec.group_size * spec.head_dim).sum((0, 2))


def unit_flops(space: PruneSpace) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """FLOPs per sample that each head / channel gate costs while its layer is kept."""
    heads = [torch.full((l.num_heads,), l.head_flops, dtype=torch.float64) for l in space.layers]
    channels = [l.channel_sizes() * l.channel_flops for l in space.layers]
    return heads, channels
