"""Decoder blocks of transformers' Llama-shaped language models (Llama, Qwen2) under the project's gates.

`GQAAttention`, `SwiGLUMLP` and `DecoderBlock` take the place of LlamaDecoderLayer / Qwen2DecoderLayer
under transformers' own names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj,
input_layernorm, post_attention_layernorm), so state dicts load unchanged; the gate arithmetic is
modules.py's.

The attention unit is a key/value group: one k/v head with the query heads reading it (transformers'
repeat_kv gives k/v head j to the consecutive query heads j*g .. j*g+g-1). Keeping whole groups leaves
every layer an ordinary grouped-query layer (num_attention_heads = g * num_key_value_heads, the same g)
and shrinks its KV cache with it. Attention runs through transformers' attention functions, rotary
embeddings and cache, so masks and the chosen implementation are the model's own.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .modules import GatedBlock, HeadGatedAttention, PrunableMLP, linear_from, out_columns


def _rows(units: torch.Tensor, per_unit: int) -> torch.Tensor:
    """Indices of the consecutive blocks of `per_unit` rows that the given units own."""
    return (units[:, None] * per_unit + torch.arange(per_unit, device=units.device)).flatten()


def weighted_attention(q, k, v, mask, scaling: float, weight: torch.Tensor) -> torch.Tensor:
    """Attention over per-head q, k, v [B, H, T, hd] whose keys count by `weight` [B, S]: the softmax
    of scores + log(weight), computed as probabilities times weight renormalised, so that a weight of 0
    keeps a finite gradient. With 0/1 weights a key of weight 0 is as good as absent. `mask`: the
    model's 4D mask (bool: True attends; float: added), None: causal. Returns [B, T, H, hd]."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if mask is None:
        t, s = scores.shape[-2:]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if mask.dtype == torch.bool:  # the dtype's least value, not -inf: a padded query's row stays finite
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask[..., :scores.shape[-1]]
    probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype) * weight[:, None, None, :].to(q.dtype)
    # a pruned token seeing only pruned ones gets 0, not 0/0 (its output is never read)
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    return torch.matmul(probs, v).transpose(1, 2)


class GQAAttention(HeadGatedAttention):
    """Grouped-query self-attention with rotary positions and a KV cache, any number of k/v groups (0 included)."""

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, o_proj: nn.Linear, head_dim: int,
                 scaling: float, config, layer_idx: int, dropout: float = 0.0, sliding_window: int | None = None):
        super().__init__()
        # registration order = transformers', so even the order of state_dict keys is unchanged
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.head_dim, self.scaling, self.attention_dropout = head_dim, scaling, dropout
        self.config, self.layer_idx, self.sliding_window = config, layer_idx, sliding_window
        self.is_causal = True  # read by transformers' sdpa / flash functions
        self._init_gates()

    @classmethod
    def from_attention(cls, attn: nn.Module) -> "GQAAttention":
        """Wrap a LlamaAttention / Qwen2Attention, sharing (not copying) its parameters."""
        return cls(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, attn.head_dim, attn.scaling, attn.config,
                   attn.layer_idx, attn.attention_dropout, getattr(attn, "sliding_window", None))

    @property
    def num_heads(self) -> int:
        return self.q_proj.out_features // self.head_dim

    @property
    def num_key_value_heads(self) -> int:
        return self.k_proj.out_features // self.head_dim

    @property
    def num_key_value_groups(self) -> int:
        """Query heads per k/v head; transformers' attention functions repeat k/v by it."""
        return self.num_heads // self.num_key_value_heads if self.num_key_value_heads else 1

    @property
    def units(self) -> int:
        return self.num_key_value_heads

    @property
    def embed_dim(self) -> int:
        return self.o_proj.out_features

    @property
    def out_layer(self) -> nn.Linear:
        return self.o_proj

    def heads_out(self, x: torch.Tensor, attn_mask=None, position_embeddings=None, cache=None,
                  **kwargs) -> torch.Tensor:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

        shape = (*x.shape[:-1], -1, self.head_dim)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if getattr(self, "cls_row", None) is not None:  # ranking visual tokens (decoder_tokens.py)
            self.record_cls(q, k.repeat_interleave(self.num_key_value_groups, 1))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if getattr(self, "key_weight", None) is not None:  # training's soft visual tokens (decoder_tokens.py)
            return weighted_attention(q, k.repeat_interleave(self.num_key_value_groups, 1),
                                      v.repeat_interleave(self.num_key_value_groups, 1), attn_mask, self.scaling,
                                      self.key_weight)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        if self.sliding_window is not None:  # Qwen2's sliding layers; Llama has none
            kwargs["sliding_window"] = self.sliding_window
        out, _ = attend(self, q, k, v, attn_mask, dropout=self.attention_dropout if self.training else 0.0,
                        scaling=self.scaling, **kwargs)
        return out  # [B, T, H, hd]

    def keep_heads(self, groups: torch.Tensor) -> "GQAAttention":
        """A new module with copies of the given key/value groups (indices) and their query heads."""
        hd, g = self.head_dim, self.num_key_value_groups
        groups = groups.to(self.q_proj.weight.device)
        kv_rows, q_heads = _rows(groups, hd), _rows(groups, g)
        grad = self.q_proj.weight.requires_grad
        q_rows = _rows(q_heads, hd)
        q, k, v = (linear_from(p.weight.detach()[rows], None if p.bias is None else p.bias.detach()[rows], grad)
                   for p, rows in ((self.q_proj, q_rows), (self.k_proj, kv_rows), (self.v_proj, kv_rows)))
        ow, ob = out_columns(self.o_proj, q_heads, hd)
        return GQAAttention(q, k, v, linear_from(ow, ob, grad), hd, self.scaling, self.config, self.layer_idx,
                            self.attention_dropout, self.sliding_window)


    @torch.no_grad()
    def owned_l1(self) -> torch.Tensor:
        """[units] L1 norm of each key/value group's own weights: the q rows of its query heads, its k and v
        rows, and the o columns of its query heads (float64)."""
        rows = [p.weight.abs().sum(1).double().view(self.units, -1).sum(1) for p in (self.q_proj, self.k_proj,
                                                                                      self.v_proj)]
        return sum(rows) + self.o_proj.weight.abs().sum(0).double().view(self.units, -1).sum(1)


class SwiGLUMLP(PrunableMLP):
    """down(act(gate(x)) * up(x)); a channel is one row of gate and up and one column of down."""

    NAMES = ("gate_proj", "act_fn", "down_proj")

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act_fn: nn.Module,
                 channel_group: int = 1):
        nn.Module.__init__(self)  # not PrunableMLP's: up_proj sits between gate and down in transformers' order
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn
        self._init_gates(channel_group)

    def hidden_act(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)

    @torch.no_grad()
    def owned_l1(self) -> torch.Tensor:
        """[hidden] L1 norm of each channel's own weights: its rows of gate and up, its column of down."""
        return self.gate_proj.weight.abs().sum(1) + self.up_proj.weight.abs().sum(1) + self.down_proj.weight.abs().sum(0)

    def keep_channels(self, channels: torch.Tensor) -> "SwiGLUMLP":
        channels = channels.to(self.gate_proj.weight.device)
        grad = self.gate_proj.weight.requires_grad
        gate, up = (linear_from(p.weight.detach()[channels],
                                None if p.bias is None else p.bias.detach()[channels], grad)
                    for p in (self.gate_proj, self.up_proj))
        down = self.down_proj
        down = linear_from(down.weight.detach()[:, channels], None if down.bias is None else down.bias.detach(), grad)
        return SwiGLUMLP(gate, up, down, copy.deepcopy(self.act_fn))


class DecoderBlock(GatedBlock):
    """LlamaDecoderLayer / Qwen2DecoderLayer with key/value-group, channel and layer gates."""

    PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")

    def __init__(self, parts: dict[str, nn.Module]):
        super().__init__()
        for name, module in parts.items():
            setattr(self, name, module)
        self._init_gates()

    @property
    def attn(self) -> GQAAttention:
        return self.self_attn

    @staticmethod
    def is_decoder_layer(layer: nn.Module) -> bool:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        return hasattr(attn, "o_proj") and hasattr(mlp, "gate_proj")

    @classmethod
    def from_layer(cls, layer: nn.Module, channel_group: int = 1) -> "DecoderBlock":
        if set(layer._modules) != set(cls.PARTS) or not cls.is_decoder_layer(layer):
            raise ValueError("expected a Llama / Qwen2 decoder layer (q/k/v/o_proj attention, gate/up/down MLP)")
        mlp = layer.mlp
        swap = {"self_attn": GQAAttention.from_attention(layer.self_attn),
                "mlp": SwiGLUMLP(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn, channel_group)}
        return cls({name: swap.get(name, module) for name, module in layer._modules.items()})

    def with_units(self, attn: GQAAttention, mlp: SwiGLUMLP) -> "DecoderBlock":
        swap = {"self_attn": attn, "mlp": mlp}
        return DecoderBlock({n: swap[n] if n in swap else copy.deepcopy(m) for n, m in self._modules.items()})

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, cache=None,
                use_cache: bool | None = False, position_embeddings=None, **kwargs) -> torch.Tensor:
        if cache is None:  # the name transformers used before 5.x
            cache = kwargs.pop("past_key_values", None)
        attn = self.branch(hidden_states, self.input_layernorm, self.self_attn, attention_mask,
                           position_embeddings=position_embeddings, position_ids=position_ids, cache=cache, **kwargs)
        x = self.residual(hidden_states, attn)
        return self.residual(x, self.branch(x, self.post_attention_layernorm, self.mlp))
