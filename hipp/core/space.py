"""The prune space: stages -> layers -> heads and MLP channel groups, with analytic unit costs.

The stages and their names are the backend's (CLIP-style models: two parallel towers, image and
text); nothing here or in the code that prices, plans or fits budgets knows them.

FLOPs follow torch.utils.flop_counter's convention: 2 per multiply-accumulate of every matmul
(linear layers, patch embedding, attention scores and mixing); norms, softmax and activations
count nothing. Costs are per sample (one image or one caption at full context length).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

@dataclass(frozen=True)
class LayerSpec:
    tower: str
    index: int
    width: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    tokens: int
    channel_group: int = 1

    @property
    def num_channel_gates(self) -> int:
        return math.ceil(self.mlp_hidden / self.channel_group)

    def channel_sizes(self) -> torch.Tensor:
        """Channels per gate (the last group may be short)."""
        sizes = torch.full((self.num_channel_gates,), self.channel_group, dtype=torch.float64)
        if self.mlp_hidden == 0:  # a pruned model's layer may have no channel left
            return sizes
        sizes[-1] = self.mlp_hidden - self.channel_group * (self.num_channel_gates - 1)
        return sizes

    # --- costs of one unit, per sample ---
    @property
    def head_flops(self) -> float:
        t, d, h = self.tokens, self.width, self.head_dim
        return 2.0 * (t * 4 * d * h + 2 * t * t * h)  # q, k, v, out projections + scores + mixing

    @property
    def channel_flops(self) -> float:
        return 2.0 * self.tokens * 2 * self.width  # one column of fc1, one row of fc2

    @property
    def head_params(self) -> float:
        return 4.0 * self.width * self.head_dim + 3 * self.head_dim  # weights + q, k, v biases

    @property
    def channel_params(self) -> float:
        return 2.0 * self.width + 1  # weights + fc1 bias

    @property
    def layer_params(self) -> float:
        """Parameters a kept layer holds whatever its heads and channels: norms, output biases."""
        return 4.0 * self.width + 2 * self.width


@dataclass(frozen=True)
class PruneSpace:
    layers: tuple[LayerSpec, ...]
    fixed_flops: dict = field(default_factory=dict)   # tower -> FLOPs outside the blocks
    fixed_params: dict = field(default_factory=dict)  # tower -> params outside the blocks

    @property
    def stages(self) -> tuple[str, ...]:
        """The backend's stages, in its order (fixed costs are declared per stage, stage by stage; a
        stage may have no prunable layer)."""
        return tuple(dict.fromkeys([*self.fixed_flops, *self.fixed_params, *(l.tower for l in self.layers)]))

    def tower_layers(self, tower: str) -> list[LayerSpec]:
        return [l for l in self.layers if l.tower == tower]

    @property
    def num_units(self) -> dict[str, int]:
        return {"layers": len(self.layers),
                "heads": sum(l.num_heads for l in self.layers),
                "channels": sum(l.num_channel_gates for l in self.layers)}

    def costs(self, layer_keep, head_keep, channel_keep) -> dict[str, torch.Tensor]:
        """FLOPs and params per tower for (soft or hard) keep values.

        layer_keep: [L]; head_keep / channel_keep: lists of [num_heads] / [num_channel_gates]
        per layer, with an optional leading batch dimension throughout. Hierarchy applies here:
        a head or channel costs only as much as its layer is kept.
        """
        out = {f"{kind}/{t}": 0.0 for kind in ("flops", "params") for t in self.stages}
        for i, spec in enumerate(self.layers):
            z = layer_keep[..., i]
            heads = head_keep[i].sum(-1)
            chans = (channel_keep[i] * spec.channel_sizes().to(channel_keep[i])).sum(-1)
            flops = z * (heads * spec.head_flops + chans * spec.channel_flops)
            params = z * (heads * spec.head_params + chans * spec.channel_params + spec.layer_params)
            out[f"flops/{spec.tower}"] = out[f"flops/{spec.tower}"] + flops
            out[f"params/{spec.tower}"] = out[f"params/{spec.tower}"] + params
        for t in self.stages:
            out[f"flops/{t}"] = out[f"flops/{t}"] + self.fixed_flops.get(t, 0.0)
            out[f"params/{t}"] = out[f"params/{t}"] + self.fixed_params.get(t, 0.0)
        return out

    def dense_costs(self) -> dict[str, float]:
        ones = self.all_kept()
        return {k: float(v) for k, v in self.costs(*ones).items()}

    def all_kept(self):
        return (torch.ones(len(self.layers), dtype=torch.float64),
                [torch.ones(l.num_heads, dtype=torch.float64) for l in self.layers],
                [torch.ones(l.num_channel_gates, dtype=torch.float64) for l in self.layers])

    def to_dict(self) -> dict:
        return {"layers": [asdict(l) for l in self.layers],
                "fixed_flops": dict(self.fixed_flops), "fixed_params": dict(self.fixed_params)}

    @classmethod
    def from_dict(cls, d: dict) -> "PruneSpace":
        return cls(tuple(LayerSpec(**l) for l in d["layers"]), dict(d["fixed_flops"]), dict(d["fixed_params"]))
