"""Prunable transformer parts every backend shares: one set of classes for the gated and the smaller model.

`HeadGatedAttention`, `PrunableMLP` and `GatedBlock` hold all the gate arithmetic; a backend's
subclass only says how its attention computes per-head outputs and what its parts are called (the
open_clip classes are in backends/open_clip.py, the transformers ones in backends/hf.py).
Parameter names are the backend's own, so pretrained state dicts load unchanged and a materialised
model's state dict has the same keys, only smaller shapes. Each class copies out its own kept units
(`keep_heads`, `keep_channels`, `shrunk`): that is all materialisation needs from a backend. A
replacement block takes over the forward hooks of the block it replaces (`carry_hooks`).

Gates are plain tensor attributes, never parameters or buffers: the state dict stays the weights
alone and autograd flows from the output back to whatever produced the gates. Every gate may carry a
leading batch dimension (one gate vector per sample) or none (shared by the whole batch).

- head gate  [..., H]:   scales each attention unit's output before out_proj (Q and K untouched,
                          so a hard 0 is exactly the unit removed); a unit is a head, or a
                          key/value group with its query heads (backends/decoder.py);
- channel gate [..., G]: scales the MLP hidden activation after the non-linearity, one value per
                          group of `channel_group` consecutive channels;
- layer gate [...]:      scales both residual branches, so 0 makes the block the identity.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


def empty_linear(in_features: int, out_features: int, bias: bool, device=None, dtype=None) -> nn.Linear:
    """An nn.Linear with uninitialised storage: its weights are about to be copied or loaded."""
    with warnings.catch_warnings():  # zero-sized layers warn that init is a no-op
        warnings.simplefilter("ignore")
        lin = nn.Linear(in_features, out_features, bias=bias, device="meta", dtype=dtype)
    return lin.to_empty(device=device if device is not None else torch.get_default_device())


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool | None = None) -> nn.Linear:
    """An nn.Linear holding copies of the given (already sliced) tensors."""
    lin = empty_linear(weight.shape[1], weight.shape[0], bias is not None, weight.device, weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    if requires_grad is not None:
        lin.requires_grad_(requires_grad)
    return lin


class PrunableBranch(nn.Module):
    """A residual branch pruning may empty (no head, no channel left): its output is then its output
    layer's bias alone, at every position."""

    @property
    def units(self) -> int:
        raise NotImplementedError

    @property
    def out_layer(self) -> nn.Linear:
        raise NotImplementedError

    @property
    def empty(self) -> bool:
        return self.units == 0

    @property
    def out_bias(self) -> torch.Tensor | None:
        return self.out_layer.bias


class HeadGatedAttention(PrunableBranch):
    """What every backend's attention shares: the head gate, per-unit statistics, the empty branch
    and the output projection. A subclass computes the per-head outputs [B, T, H, hd] in `heads_out`.

    The gate has one value per attention unit (`units`): a head here; a subclass under grouped-query
    attention makes a unit a key/value group, whose query heads are consecutive in [B, T, H, hd], so
    the same arithmetic gates [B, T, units, heads_per_unit * hd].
    """

    num_heads: int
    head_dim: int
    out_proj: nn.Linear

    def _init_gates(self) -> None:
        self.head_gate: torch.Tensor | None = None
        self.stats: dict | None = None  # when a dict, forward accumulates per-head mean outputs

    def heads_out(self, x: torch.Tensor, attn_mask=None, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def record_cls(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """While `cls_row` is a list (backends/token_rank.py), append the attention logits [B, H, T] of
        query `row_query` (0: the class token; -1: the last) from the per-head queries and keys
        [B, H, T, hd]: what ranks tokens for pruning."""
        rows = getattr(self, "cls_row", None)
        if rows is not None:
            at = getattr(self, "row_query", 0) % q.shape[2]
            rows.append(torch.matmul(q[:, :, at:at + 1], k.transpose(-1, -2))[:, :, 0] * self.head_dim ** -0.5)

    @property
    def units(self) -> int:
        return self.num_heads

    @property
    def out_layer(self) -> nn.Linear:
        return self.out_proj

    @torch.no_grad()
    def owned_l1(self) -> torch.Tensor:
        """[units] L1 norm of the weights that exist only for each unit: its q, k, v rows of the input
        projection and its columns of the output projection (float64)."""
        d = self.embed_dim
        w_in = self.qkv_weight.abs().view(3, self.num_heads * self.head_dim, d).sum((0, 2))
        per_dim = (w_in + self.out_layer.weight.abs().sum(0)).double()
        return per_dim.reshape(-1, self.units, per_dim.numel() // self.units).sum((0, 2))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if self.empty:
            return _bias_only(x, self.out_bias)
        out = self.heads_out(x, attn_mask, **kwargs)  # [B, T, H, hd]
        batch, tokens = out.shape[:2]
        out = out.reshape(batch, tokens, self.units, -1)  # a no-op unless a unit holds several heads
        if self.stats is not None:
            _accumulate(self.stats, out.detach().float().sum(dim=(0, 1)), batch * tokens)  # [units, dims]
        gate = self.head_gate
        if gate is not None:  # [..., U] -> [B or 1, 1, U, 1]
            gate = gate.to(out.dtype)
            out = out * gate.reshape(gate.shape[:-1] + (1,) * (gate.dim() - 1) + (self.units, 1))
        return self.out_layer(out.reshape(batch, tokens, -1))


def out_columns(out_proj: nn.Linear, heads: torch.Tensor, head_dim: int):
    """out_proj's weight columns of the given heads, and its (whole) bias."""
    d = out_proj.weight.shape[0]
    ow = out_proj.weight.detach().view(d, -1, head_dim)[:, heads].reshape(d, -1)
    return ow, None if out_proj.bias is None else out_proj.bias.detach()


class PrunableMLP(PrunableBranch):
    """fc -> activation -> (channel gate) -> proj, with any hidden width (0 included).

    A backend's subclass sets NAMES, the submodule names of its MLP (fc in, activation, fc out), so
    state-dict keys are unchanged: open_clip's c_fc / gelu / c_proj, transformers' fc1 / activation_fn / fc2.
    """

    NAMES: tuple[str, str, str]

    def __init__(self, fc_in: nn.Linear, act: nn.Module, fc_out: nn.Linear, channel_group: int = 1):
        super().__init__()
        for name, module in zip(self.NAMES, (fc_in, act, fc_out)):
            setattr(self, name, module)
        self._init_gates(channel_group)

    def _init_gates(self, channel_group: int) -> None:
        self.channel_group = channel_group
        self.channel_gate: torch.Tensor | None = None
        self.stats: dict | None = None  # when a dict, forward accumulates per-channel mean activations

    @property
    def fc_in(self) -> nn.Linear:
        return getattr(self, self.NAMES[0])

    @property
    def act(self) -> nn.Module:
        return getattr(self, self.NAMES[1])

    @property
    def fc_out(self) -> nn.Linear:
        return getattr(self, self.NAMES[2])

    @property
    def hidden(self) -> int:
        return self.fc_in.out_features

    @property
    def units(self) -> int:
        return self.hidden

    @property
    def out_layer(self) -> nn.Linear:
        return self.fc_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.empty:
            return _bias_only(x, self.out_bias)
        h = self.hidden_act(x)
        if self.stats is not None:
            _accumulate(self.stats, h.detach().float().reshape(-1, self.hidden).sum(0), h.numel() // self.hidden)
        gate = self.channel_gate
        if gate is not None:
            gate = gate.to(h.dtype)
            if self.channel_group != 1:  # one value per group -> one per channel (last group may be short)
                gate = gate.repeat_interleave(self.channel_group, dim=-1)[..., : self.hidden]
            h = h * gate.reshape(gate.shape[:-1] + (1,) * (h.dim() - gate.dim()) + (self.hidden,))
        return self.fc_out(h)

    def hidden_act(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden activation the channel gate scales, [..., hidden]."""
        return self.act(self.fc_in(x))

    @torch.no_grad()
    def owned_l1(self) -> torch.Tensor:
        """[hidden] L1 norm of each channel's own weights: its row of fc_in and its column of fc_out."""
        return self.fc_in.weight.abs().sum(1) + self.fc_out.weight.abs().sum(0)

    def keep_channels(self, channels: torch.Tensor) -> "PrunableMLP":
        """A new module of the same class with copies of the given hidden channels only."""
        fc, proj = self.fc_in, self.fc_out
        channels = channels.to(fc.weight.device)
        grad = fc.weight.requires_grad
        fc_in = linear_from(fc.weight.detach()[channels], None if fc.bias is None else fc.bias.detach()[channels], grad)
        fc_out = linear_from(proj.weight.detach()[:, channels], None if proj.bias is None else proj.bias.detach(), grad)
        return type(self)(fc_in, copy.deepcopy(self.act), fc_out)


def _bias_only(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """An empty branch's output: its bias at every position, as a fresh tensor (an expanded view of a
    parameter under no_grad would claim requires_grad without a grad_fn, which breaks module hooks)."""
    out = x.new_zeros(x.shape)
    return out if bias is None else out + bias.to(x.dtype)


def _accumulate(stats: dict, total: torch.Tensor, count: int) -> None:
    stats["sum"] = stats["sum"] + total if "sum" in stats else total
    stats["count"] = stats.get("count", 0) + count


class GatedBlock(nn.Module):
    """What every backend's pre-norm block shares: the layer gate on both residual branches.

    A subclass names its parts as its backend does and exposes them as `attn` / `mlp`.
    """

    attn: HeadGatedAttention
    mlp: PrunableMLP

    def _init_gates(self) -> None:
        self.layer_gate: torch.Tensor | None = None

    def set_gates(self, layer=None, heads=None, channels=None) -> None:
        self.layer_gate, self.attn.head_gate, self.mlp.channel_gate = layer, heads, channels

    def get_weight_dtype(self) -> torch.dtype:  # open_clip's Transformer.get_cast_dtype asks block 0
        return self.mlp.fc_in.weight.dtype

    @staticmethod
    def branch(x: torch.Tensor, norm: nn.Module, module: PrunableBranch, *args, **kwargs) -> torch.Tensor:
        """module(norm(x)); for an emptied module just its output bias (broadcast over positions), so a
        materialised model spends no time on the norm or the module of a branch it removed."""
        if module.empty:
            bias = module.out_bias
            return x.new_zeros(()) if bias is None else bias.to(x.dtype)
        return module(norm(x), *args, **kwargs)

    def residual(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        z = self.layer_gate
        if z is None:
            return x + branch
        return x + branch * z.to(x.dtype).reshape(z.shape + (1, 1))  # [] -> [1, 1], [B] -> [B, 1, 1]

    def with_units(self, attn: HeadGatedAttention, mlp: PrunableMLP) -> "GatedBlock":
        """A new block of the same class: these attention and MLP modules, copies of the norms."""
        raise NotImplementedError

    def shrunk(self, heads: torch.Tensor, channels: torch.Tensor) -> "GatedBlock":
        """A smaller copy with the given heads and MLP channels (indices into the original ones)."""
        return self.with_units(self.attn.keep_heads(heads), self.mlp.keep_channels(channels))


def carry_hooks(old: nn.Module, new: nn.Module) -> nn.Module:
    """`new`, given the forward hooks of the block it replaces. transformers records hidden states
    through hooks it installs once per model on its own layer classes, and LLaVA takes its image
    features from them: a gated, shrunk or dropped block must report its output where the layer did."""
    if new is not old:
        for hook in old._forward_hooks.values():
            if hook not in new._forward_hooks.values():
                new.register_forward_hook(hook)
    return new


class DroppedBlock(nn.Module):
    """A removed layer: the identity, with no weights.

    It holds an empty non-persistent buffer only so that open_clip's get_cast_dtype (which asks
    resblocks[0]) still reports the model's dtype when the first layer, or every layer, is gone.
    """

    def __init__(self, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.register_buffer("_dtype_probe", torch.empty(0, dtype=dtype, device=device), persistent=False)

    def get_weight_dtype(self) -> torch.dtype:
        return self._dtype_probe.dtype

    def forward(self, x: torch.Tensor, *args, **kwargs):  # any backend's block signature
        return x
