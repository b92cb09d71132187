"""Analytic FLOPs and parameters per block kind: attention (MHA or GQA), MLP (plain or gated), norms.

FLOPs follow torch.utils.flop_counter so that analytic equals counted exactly: 2 per multiply-accumulate
of every matmul; bias adds, norms, softmax, rotary embeddings and activations count nothing; a causal
mask saves nothing. Each prunable kind splits as whole == num_units * unit + layer (the part that
stays while the layer stays). Sums are exact integers turned into floats on return, so a CLIP block is
bit-identical to hipp.core.space.LayerSpec's float formulas.

Attention work needs two numbers per sample, held by a `Load`: query tokens (every projection runs on
them) and query-key pairs scored. prefill(t) is self-attention over t tokens; prefill(t, context=c) is
t new tokens against c keys, c - t of them cached; decode(prompt, steps) is `steps` one-token steps
after a prompt-token prefill, step i attending to prompt + i + 1 keys (the cache and itself). Cost
methods take a Load, or an int t and optional context meaning prefill(t, context). Cross-attention
(k/v projected from another sequence) is not modelled.
"""
from __future__ import annotations

from dataclasses import dataclass

UNITS = ("kv_group", "head")


@dataclass(frozen=True)
class Load:
    tokens: int  # query tokens that pass through the projections
    pairs: int   # query-key pairs scored (and mixed) per head

    def __add__(self, other: "Load") -> "Load":
        return Load(self.tokens + other.tokens, self.pairs + other.pairs)


def prefill(tokens: int, context: int | None = None) -> Load:
    context = tokens if context is None else context
    if tokens < 0 or context < tokens:
        raise ValueError(f"need 0 <= tokens <= context, got tokens={tokens}, context={context}")
    return Load(tokens, tokens * context)


def decode(prompt: int, steps: int) -> Load:
    if prompt < 0 or steps < 0:
        raise ValueError(f"need prompt >= 0 and steps >= 0, got {prompt}, {steps}")
    # sum of (prompt + i + 1) for i < steps; steps * (steps - 1) is even, so this stays exact
    return Load(steps, steps * (prompt + 1) + steps * (steps - 1) // 2)


def _load(tokens: int | Load, context: int | None) -> Load:
    if isinstance(tokens, Load):
        if context is not None:
            raise ValueError("give a context with an int token count, not with a Load")
        return tokens
    return prefill(tokens, context)


class _Prunable:
    """Float costs per sample from a subclass's num_units, _unit_macs, _layer_macs, _unit_params, _layer_params."""

    def _macs(self, load: Load) -> int:
        return self.num_units * self._unit_macs(load) + self._layer_macs(load)

    def _params(self) -> int:
        return self.num_units * self._unit_params() + self._layer_params()

    def unit_flops(self, tokens: int | Load, context: int | None = None) -> float:
        return float(2 * self._unit_macs(_load(tokens, context)))

    def layer_flops(self, tokens: int | Load, context: int | None = None) -> float:
        return float(2 * self._layer_macs(_load(tokens, context)))

    def flops(self, tokens: int | Load, context: int | None = None) -> float:
        return float(2 * self._macs(_load(tokens, context)))

    def decode_flops(self, prompt: int, steps: int) -> float:
        return self.flops(decode(prompt, steps))

    @property
    def unit_params(self) -> float:
        return float(self._unit_params())

    @property
    def layer_params(self) -> float:
        return float(self._layer_params())

    @property
    def params(self) -> float:
        return float(self._params())


@dataclass(frozen=True)
class AttentionCost(_Prunable):
    """`heads` query heads sharing `kv_heads` key/value heads (None: plain MHA).

    Default unit: a key/value group, one k/v head with the query heads reading it. Dropping one removes
    k/v rows and its KV-cache slice, and leaves a regular GQA layer, the only shape Llama/Qwen2 configs
    express. unit="head" prices one query head: finer, but k/v stay with the layer (an overestimate once
    a whole group is gone), and only plans keeping equal counts per group materialise. Under MHA a
    group is one head and both units give the same numbers.
    """
    width: int
    heads: int
    head_dim: int
    kv_heads: int | None = None
    qkv_bias: bool = True
    out_bias: bool = True
    unit: str = "kv_group"

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        if min(self.width, self.heads, self.head_dim, self.num_kv_heads) < 0:
            raise ValueError(f"negative size in {self}")
        if self.heads % max(self.num_kv_heads, 1) or (self.num_kv_heads == 0) != (self.heads == 0):
            raise ValueError(f"{self.heads} query heads cannot share {self.num_kv_heads} key/value heads evenly")

    @property
    def num_kv_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for MHA, and for a layer with no head left)."""
        return self.heads // self.num_kv_heads if self.num_kv_heads else 1

    @property
    def num_units(self) -> int:
        return self.num_kv_heads if self.unit == "kv_group" else self.heads

    @property
    def _unit_heads(self) -> int:
        return self.group_size if self.unit == "kv_group" else 1

    @property
    def _unit_owns_kv(self) -> bool:
        return self.unit == "kv_group" or self.group_size == 1

    # multiply-accumulates, exact
    def _query_head_macs(self, load: Load) -> int:
        d, h = self.width, self.head_dim
        return load.tokens * d * h * 2 + load.pairs * h * 2  # q and out projections; scores and mixing

    def _kv_head_macs(self, load: Load) -> int:
        return load.tokens * self.width * self.head_dim * 2  # k and v projections

    def _unit_macs(self, load: Load) -> int:
        return self._unit_heads * self._query_head_macs(load) + self._unit_owns_kv * self._kv_head_macs(load)

    def _layer_macs(self, load: Load) -> int:
        return 0 if self._unit_owns_kv else self.num_kv_heads * self._kv_head_macs(load)

    def _query_head_params(self) -> int:
        return 2 * self.width * self.head_dim + self.qkv_bias * self.head_dim

    def _kv_head_params(self) -> int:
        return 2 * (self.width * self.head_dim + self.qkv_bias * self.head_dim)

    def _unit_params(self) -> int:
        return self._unit_heads * self._query_head_params() + self._unit_owns_kv * self._kv_head_params()

    def _layer_params(self) -> int:
        kv = 0 if self._unit_owns_kv else self.num_kv_heads * self._kv_head_params()
        return kv + self.out_bias * self.width


@dataclass(frozen=True)
class MLPCost(_Prunable):
    """fc1 -> act -> fc2 (plain) or down(act(gate) * up) (gated, SwiGLU); the unit is one hidden channel.

    Its cost depends on the token count only; a context given to its methods is ignored.
    """
    width: int
    hidden: int
    gated: bool = False
    bias: bool = True

    @property
    def num_units(self) -> int:
        return self.hidden

    @property
    def _mats(self) -> int:
        return 3 if self.gated else 2

    def _unit_macs(self, load: Load) -> int:
        return load.tokens * self._mats * self.width

    def _layer_macs(self, load: Load) -> int:
        return 0

    def _unit_params(self) -> int:
        # a channel owns a row or column of every matrix and its entry in each input-side bias
        return self._mats * self.width + self.bias * (self._mats - 1)

    def _layer_params(self) -> int:
        return self.bias * self.width  # fc2 / down bias


@dataclass(frozen=True)
class NormCost:
    """`count` LayerNorms (bias=True) or RMSNorms (bias=False); flop_counter counts no FLOPs for them."""
    width: int
    bias: bool = True
    count: int = 2

    def _params(self) -> int:
        return self.count * (1 + self.bias) * self.width

    @property
    def params(self) -> float:
        return float(self._params())


@dataclass(frozen=True)
class BlockCost:
    """A pre-norm transformer block: attention + MLP + norms, each priced as above."""
    attention: AttentionCost
    mlp: MLPCost
    norm: NormCost

    @classmethod
    def vit(cls, width: int, heads: int, head_dim: int, hidden: int) -> "BlockCost":
        """CLIP/ViT encoder block: MHA and fc1/fc2 with biases everywhere, two LayerNorms."""
        return cls(AttentionCost(width, heads, head_dim), MLPCost(width, hidden), NormCost(width))

    @classmethod
    def decoder(cls, width: int, heads: int, head_dim: int, kv_heads: int, hidden: int,
                qkv_bias: bool = False, unit: str = "kv_group") -> "BlockCost":
        """Llama (qkv_bias=False) or Qwen2 (qkv_bias=True) block: GQA, SwiGLU, two RMSNorms, no other bias."""
        return cls(AttentionCost(width, heads, head_dim, kv_heads, qkv_bias, out_bias=False, unit=unit),
                   MLPCost(width, hidden, gated=True, bias=False), NormCost(width, bias=False))

    def flops(self, tokens: int | Load, context: int | None = None) -> float:
        load = _load(tokens, context)
        return float(2 * (self.attention._macs(load) + self.mlp._macs(load)))

    def decode_flops(self, prompt: int, steps: int) -> float:
        return self.flops(decode(prompt, steps))

    def layer_flops(self, tokens: int | Load, context: int | None = None) -> float:
        """FLOPs a kept layer spends whatever its units: shared k/v projections under unit="head", else 0."""
        return self.attention.layer_flops(tokens, context)

    @property
    def params(self) -> float:
        return float(self.attention._params() + self.mlp._params() + self.norm._params())

    @property
    def layer_params(self) -> float:
        """What a kept layer holds whatever its units: norms, output biases, shared k/v under unit="head"."""
        return float(self.attention._layer_params() + self.mlp._layer_params() + self.norm._params())
