"""The prune space: stages -> layers -> heads and MLP channel groups, with analytic unit costs.

The stages and their names are the backend's (CLIP-style models: two parallel towers, image and
text); nothing here or in the code that prices, plans or fits budgets knows them.

FLOPs follow torch.utils.flop_counter's convention: 2 per multiply-accumulate of every matmul
(linear layers, patch embedding, attention scores and mixing); norms, softmax and activations
count nothing. Costs are per sample (one image, one caption at full context length, or one prefill of
a decoder's declared prompt length), priced by the cost models of hipp/core/costs.py.

A space may also hold token levels (`TokenLevel`): a count of tokens a plan keeps, which every layer
of a stage after a given one then processes instead of all. Attention's work grows with the square of
the tokens, so a layer's unit costs are then a function of the kept count (`LayerSpec.unit_flops_at`),
exact for whole counts and differentiable in a soft one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import cached_property

import torch

from .costs import AttentionCost, BlockCost, Load, MLPCost, NormCost

# fields a CLIP / ViT block leaves at these values; to_dict omits them, so files written before
# decoder blocks existed are read back unchanged and still compare equal
BLOCK_DEFAULTS = {"group_size": 1, "qkv_bias": 1, "out_bias": 1, "mlp_gated": 0, "mlp_bias": 1, "norm_bias": 1}


@dataclass(frozen=True)
class LayerSpec:
    """One prunable block. `num_heads` counts attention units, the gates of its attention: a head under
    multi-head attention, a key/value group (one k/v head and the `group_size` query heads reading it)
    under grouped-query attention, so that dropping a unit leaves an ordinary GQA layer. The fields
    after channel_group say how the block is priced (hipp/core/costs.py); the flags among them are
    0/1 ints, not bools, because a controller file's layer fields must be whole numbers. Their
    defaults describe a CLIP block (multi-head attention, biases everywhere, fc1/fc2, LayerNorm)."""
    tower: str
    index: int
    width: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    tokens: int
    channel_group: int = 1
    group_size: int = 1  # query heads per attention unit, sharing one key/value head
    qkv_bias: int = 1
    out_bias: int = 1    # attention output projection
    mlp_gated: int = 0   # SwiGLU: down(act(gate(x)) * up(x))
    mlp_bias: int = 1    # every linear of the MLP
    norm_bias: int = 1   # 1: LayerNorm, 0: RMSNorm

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

    @cached_property  # unit costs are read per layer on every costs() call
    def block_cost(self) -> BlockCost:
        """The block's cost model; under its defaults exactly the CLIP formulas (tests/test_costs.py)."""
        heads = self.num_heads * self.group_size
        attention = AttentionCost(self.width, heads, self.head_dim, self.num_heads, bool(self.qkv_bias),
                                  bool(self.out_bias))
        return BlockCost(attention, MLPCost(self.width, self.mlp_hidden, bool(self.mlp_gated), bool(self.mlp_bias)),
                         NormCost(self.width, bool(self.norm_bias)))

    # --- costs of one unit, per sample (a prefill of `tokens` tokens) ---
    @property
    def head_flops(self) -> float:
        return self.block_cost.attention.unit_flops(self.tokens)

    @property
    def channel_flops(self) -> float:
        return self.block_cost.mlp.unit_flops(self.tokens)

    @property
    def head_params(self) -> float:
        return self.block_cost.attention.unit_params

    @property
    def channel_params(self) -> float:
        return self.block_cost.mlp.unit_params

    @property
    def layer_params(self) -> float:
        """Parameters a kept layer holds whatever its units: norms, output biases."""
        return self.block_cost.layer_params

    def unit_flops_at(self, tokens):
        """(FLOPs of one attention unit, of one MLP channel) when the layer processes `tokens` tokens
        (a number or a tensor, soft counts included): attention is linear in tokens and in scored
        pairs (tokens squared), the MLP linear in tokens."""
        attention, mlp = self.block_cost.attention, self.block_cost.mlp
        per_token, per_pair = attention.unit_flops(Load(1, 0)), attention.unit_flops(Load(0, 1))
        return per_token * tokens + per_pair * tokens * tokens, mlp.unit_flops(Load(1, 0)) * tokens

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in BLOCK_DEFAULTS or v != BLOCK_DEFAULTS[k]}


@dataclass(frozen=True)
class TokenLevel:
    """Tokens a plan may prune: of the `tokens` prunable ones (a LLaVA's image tokens), a plan keeps
    a count, ranked by `rule`; every layer of `stage` after layer `after` (-1: all of them) then
    processes that many instead. Outside the blocks, `fixed_stage` spends `per_token_flops` per kept
    token (LLaVA's projector), and ranking costs `rank_flops` per attention unit of layer `rank_layer`
    (of `rank_stage`) that the plan keeps: its class token's attention row, computed only when tokens go."""
    stage: str
    tokens: int
    after: int = -1
    rule: str = "cls"
    fixed_stage: str = ""
    per_token_flops: float = 0.0
    rank_stage: str = ""
    rank_layer: int = -1
    rank_flops: float = 0.0

    def reaches(self, spec: LayerSpec) -> bool:
        return spec.tower == self.stage and spec.index > self.after

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PruneSpace:
    layers: tuple[LayerSpec, ...]
    fixed_flops: dict = field(default_factory=dict)   # tower -> FLOPs outside the blocks
    fixed_params: dict = field(default_factory=dict)  # tower -> params outside the blocks
    tokens: tuple[TokenLevel, ...] = ()               # token levels, when the plan prunes tokens too

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

    def costs(self, layer_keep, head_keep, channel_keep, token_keep=None) -> dict[str, torch.Tensor]:
        """FLOPs and params per tower for (soft or hard) keep values.

        layer_keep: [L]; head_keep / channel_keep: lists of [num_heads] / [num_channel_gates]
        per layer; token_keep: [len(self.tokens)] kept counts (None: every token); each with an
        optional leading batch dimension. Hierarchy applies here: a head or channel costs only as
        much as its layer is kept.
        """
        out = {f"{kind}/{t}": 0.0 for kind in ("flops", "params") for t in self.stages}
        shed = self._shed(token_keep)
        for i, (spec, (head_flops, channel_flops)) in enumerate(zip(self.layers, self._unit_flops(shed))):
            z = layer_keep[..., i]
            heads = head_keep[i].sum(-1)
            chans = (channel_keep[i] * spec.channel_sizes().to(channel_keep[i])).sum(-1)
            flops = z * (heads * head_flops + chans * channel_flops)
            params = z * (heads * spec.head_params + chans * spec.channel_params + spec.layer_params)
            out[f"flops/{spec.tower}"] = out[f"flops/{spec.tower}"] + flops
            out[f"params/{spec.tower}"] = out[f"params/{spec.tower}"] + params
        for t in self.stages:
            out[f"flops/{t}"] = out[f"flops/{t}"] + self.fixed_flops.get(t, 0.0)
            out[f"params/{t}"] = out[f"params/{t}"] + self.fixed_params.get(t, 0.0)
        for level, g in zip(self.tokens, shed or ()):
            if level.fixed_stage:
                out[f"flops/{level.fixed_stage}"] = out[f"flops/{level.fixed_stage}"] - level.per_token_flops * g
        return out

    def unit_flops(self, token_keep=None) -> list:
        """Per layer, (FLOPs of one attention unit, of one MLP channel) at the kept token counts."""
        return self._unit_flops(self._shed(token_keep))

    def _unit_flops(self, shed) -> list:
        if shed is None:
            return [(spec.head_flops, spec.channel_flops) for spec in self.layers]
        out = []
        for spec in self.layers:
            gone = sum((g for level, g in zip(self.tokens, shed) if level.reaches(spec)), 0.0)
            head, channel = spec.unit_flops_at(spec.tokens - gone)
            rank = sum((level.rank_flops * (g > 0) for level, g in zip(self.tokens, shed)
                        if (level.rank_stage, level.rank_layer) == (spec.tower, spec.index)), 0.0)
            out.append((head + rank, channel))
        return out

    def _shed(self, token_keep):
        """Tokens each level drops ([..., levels] -> a list of [...]), or None when all are kept."""
        if token_keep is None or not self.tokens:
            return None
        keep = torch.as_tensor(token_keep, dtype=torch.float64)
        if keep.shape[-1:] != (len(self.tokens),):
            raise ValueError(f"token_keep must end in {len(self.tokens)} levels, got shape {tuple(keep.shape)}")
        return [level.tokens - keep[..., j] for j, level in enumerate(self.tokens)]

    def dense_costs(self) -> dict[str, float]:
        ones = self.all_kept()
        return {k: float(v) for k, v in self.costs(*ones).items()}

    def all_kept(self):
        return (torch.ones(len(self.layers), dtype=torch.float64),
                [torch.ones(l.num_heads, dtype=torch.float64) for l in self.layers],
                [torch.ones(l.num_channel_gates, dtype=torch.float64) for l in self.layers])

    def all_tokens(self) -> torch.Tensor:
        """Every token kept, as the [levels] counts PruneSpace.costs takes."""
        return torch.tensor([float(level.tokens) for level in self.tokens], dtype=torch.float64)

    def with_tokens(self, *levels: TokenLevel) -> "PruneSpace":
        return PruneSpace(self.layers, self.fixed_flops, self.fixed_params, tuple(levels))

    def to_dict(self) -> dict:
        out = {"layers": [l.to_dict() for l in self.layers],
               "fixed_flops": dict(self.fixed_flops), "fixed_params": dict(self.fixed_params)}
        if self.tokens:  # files of spaces without tokens read back unchanged
            out["tokens"] = [level.to_dict() for level in self.tokens]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "PruneSpace":
        return cls(tuple(LayerSpec(**l) for l in d["layers"]), dict(d["fixed_flops"]), dict(d["fixed_params"]),
                   tuple(TokenLevel(**t) for t in d.get("tokens") or ()))
