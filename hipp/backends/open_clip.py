"""open_clip backend: CLIP / CustomTextCLIP, their blocks under the project's gates, and what lies outside them.

`PrunableAttention` and `PrunableBlock` take the place of open_clip's nn.MultiheadAttention and
ResidualAttentionBlock under open_clip's own parameter names (`attn.in_proj_weight`,
`attn.out_proj.*`, `mlp.c_fc.*`, `mlp.c_proj.*`, `ln_1`, `ln_2`, `ls_1`, `ls_2`), so state dicts
load unchanged; all the gate arithmetic is inherited from modules.py.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HippError
from .base import Backend, Stage, register
from .modules import (GatedBlock, HeadGatedAttention, PrunableMLP, empty_linear, linear_from,
                      out_columns)


def _additive_mask(attn_mask: torch.Tensor | None, batch: int, tokens: int, dtype) -> torch.Tensor | None:
    """open_clip's mask as SDPA wants it: additive float, and one mask for all heads.

    A bool mask follows nn.MultiheadAttention (True = blocked), the opposite of SDPA's bool meaning,
    so it becomes -inf. A 3-D mask is [B * heads_of_the_original_model, T, T] with the same mask
    repeated per head; keeping one copy per sample makes it valid for any (pruned) head count.
    """
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(
            attn_mask, float("-inf"))
    else:
        attn_mask = attn_mask.to(dtype)
    if attn_mask.dim() == 3 and attn_mask.shape[0] > 1:
        attn_mask = attn_mask.reshape(batch, -1, tokens, tokens)[:, :1]
    return attn_mask


class PrunableAttention(HeadGatedAttention):
    """Multi-head self-attention with any number of heads (0 included) and an optional head gate.

    Stands in for the batch-first nn.MultiheadAttention of open_clip's ResidualAttentionBlock.
    head_dim is stored, not derived from the width, because a pruned layer keeps the original
    head size (and so the original 1/sqrt(head_dim) scale) with fewer heads.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout = dropout
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, device=device, dtype=dtype))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * inner, device=device, dtype=dtype))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = empty_linear(inner, embed_dim, bias, device, dtype)
        self._init_gates()

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "PrunableAttention":
        """Wrap an existing nn.MultiheadAttention, sharing (not copying) its parameters."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("only plain self-attention (packed in_proj, no bias_k/v, no zero_attn) is supported")
        self = cls(mha.embed_dim, mha.num_heads, mha.head_dim, bias=mha.in_proj_bias is not None,
                   dropout=mha.dropout, device="meta")  # meta: placeholders, replaced just below
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        return self

    @classmethod
    def from_weights(cls, in_proj_weight, in_proj_bias, out_weight, out_bias, head_dim: int,
                     dropout: float = 0.0, requires_grad: bool | None = None) -> "PrunableAttention":
        """A new module holding copies of the given (already sliced) tensors."""
        embed_dim = in_proj_weight.shape[1]
        heads = in_proj_weight.shape[0] // (3 * head_dim)
        self = cls(embed_dim, heads, head_dim, bias=in_proj_bias is not None, dropout=dropout,
                   device=in_proj_weight.device, dtype=in_proj_weight.dtype)
        with torch.no_grad():
            self.in_proj_weight.copy_(in_proj_weight)
            if in_proj_bias is not None:
                self.in_proj_bias.copy_(in_proj_bias)
        self.out_proj = linear_from(out_weight, out_bias)
        if requires_grad is not None:
            self.requires_grad_(requires_grad)
        return self

    @property
    def qkv_weight(self) -> torch.Tensor:
        """[3 * H * hd, D]: the q, k, v rows, head-major within each (the layout every backend shares)."""
        return self.in_proj_weight

    @property
    def qkv_bias(self) -> torch.Tensor | None:
        return self.in_proj_bias

    def heads_out(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        self.record_cls(q, k)
        mask = _additive_mask(attn_mask, batch, tokens, q.dtype)  # q's dtype: under autocast it may differ from x's
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2)

    def keep_heads(self, heads: torch.Tensor) -> "PrunableAttention":
        """A new module with copies of the given heads only."""
        d, h, hd = self.embed_dim, self.num_heads, self.head_dim
        heads = heads.to(self.in_proj_weight.device)
        w = self.in_proj_weight.detach().view(3, h, hd, d)[:, heads].reshape(-1, d)
        b = self.in_proj_bias
        b = None if b is None else b.detach().view(3, h, hd)[:, heads].reshape(-1)
        ow, ob = out_columns(self.out_proj, heads, hd)
        return PrunableAttention.from_weights(w, b, ow, ob, hd, dropout=self.dropout,
                                              requires_grad=self.in_proj_weight.requires_grad)


class OpenClipMLP(PrunableMLP):
    """open_clip's MLP (an nn.Sequential of c_fc, gelu, c_proj) with a channel gate."""

    NAMES = ("c_fc", "gelu", "c_proj")


class PrunableBlock(GatedBlock):
    """Pre-norm residual block (open_clip's ResidualAttentionBlock) with head, channel and layer gates."""

    def __init__(self, ln_1: nn.Module, attn: PrunableAttention, ls_1: nn.Module,
                 ln_2: nn.Module, mlp: OpenClipMLP, ls_2: nn.Module):
        super().__init__()
        # registration order = open_clip's, so even the order of state_dict keys is unchanged
        self.ln_1, self.attn, self.ls_1 = ln_1, attn, ls_1
        self.ln_2, self.mlp, self.ls_2 = ln_2, mlp, ls_2
        self._init_gates()

    @classmethod
    def from_block(cls, block: nn.Module, channel_group: int = 1) -> "PrunableBlock":
        """Wrap an open_clip ResidualAttentionBlock, sharing its parameters."""
        if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
            raise ValueError("expected open_clip's ResidualAttentionBlock (nn.MultiheadAttention inside); "
                             "custom attention blocks are not supported")
        if hasattr(block, "ln_1_kv"):
            raise ValueError("cross-attention blocks are not supported")
        if not getattr(block.attn, "batch_first", False):
            raise ValueError("only batch_first attention is supported")
        mlp = OpenClipMLP(block.mlp.c_fc, block.mlp.gelu, block.mlp.c_proj, channel_group)
        return cls(block.ln_1, PrunableAttention.from_mha(block.attn), block.ls_1, block.ln_2, mlp, block.ls_2)

    def with_units(self, attn: HeadGatedAttention, mlp: PrunableMLP) -> "PrunableBlock":
        c = copy.deepcopy
        return PrunableBlock(c(self.ln_1), attn, c(self.ls_1), c(self.ln_2), mlp, c(self.ls_2))

    def forward(self, q_x: torch.Tensor, k_x=None, v_x=None, attn_mask: torch.Tensor | None = None):
        if k_x is not None or v_x is not None:
            raise ValueError("PrunableBlock is self-attention only")
        x = self.residual(q_x, self.ls_1(self.branch(q_x, self.ln_1, self.attn, attn_mask=attn_mask)))
        return self.residual(x, self.ls_2(self.branch(x, self.ln_2, self.mlp)))


# --- the backend ---

def _text(model: nn.Module) -> nn.Module:
    """CLIP keeps the text tower's parts on the model itself; CustomTextCLIP wraps them in .text."""
    return model.text if hasattr(model, "text") else model


def _count(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@register
class OpenClipBackend(Backend):
    name = "open_clip"

    def owns(self, model: nn.Module) -> bool:
        return hasattr(model, "visual") and hasattr(model, "encode_text")

    def blocks(self, model: nn.Module) -> dict[str, nn.ModuleList]:
        try:
            return {"image": model.visual.transformer.resblocks, "text": _text(model).transformer.resblocks}
        except AttributeError:
            raise HippError(f"{type(model).__name__} is not an open_clip ViT CLIP model "
                            "(expected .visual.transformer and a text transformer)") from None

    def stages(self, model: nn.Module) -> dict[str, Stage]:
        blocks = self.blocks(model)
        flops = self._fixed_flops(model)
        image = _count(model.visual)  # the text stage is everything else (token embedding, logit scale)
        params = {"image": image - _count(*blocks["image"]), "text": _count(model) - image - _count(*blocks["text"])}
        tokens = {"image": model.visual.positional_embedding.shape[0], "text": self.context_length(model)}
        return {s: Stage(blocks[s], tokens[s], flops[s], params[s]) for s in blocks}

    def token_levels(self, model: nn.Module, rule: str | None = None) -> tuple:
        """The image patches after a quarter of the image layers, ranked by the class token's attention."""
        if getattr(model.visual, "class_embedding", None) is None:
            return ()
        from . import tower_tokens
        blocks = self.blocks(model)["image"]
        return (tower_tokens.level("image", blocks, model.visual.positional_embedding.shape[0],
                                   tower_tokens.default_after(len(blocks)), self.block_shape(blocks[0])[2]),)

    @staticmethod
    def _fixed_flops(model: nn.Module) -> dict[str, float]:
        """Matmul FLOPs outside the blocks: patch embedding and the two projections."""
        visual, text = model.visual, _text(model)
        conv = visual.conv1
        patches = visual.positional_embedding.shape[0] - 1
        embed_dim = visual.proj.shape[1] if visual.proj is not None else visual.transformer.width
        proj_text = text.text_projection
        text_out = (proj_text.out_features if isinstance(proj_text, nn.Linear)
                    else proj_text.shape[1] if proj_text is not None else 0)
        return {
            "image": 2.0 * patches * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
            + (2.0 * visual.transformer.width * embed_dim if visual.proj is not None else 0.0),
            "text": 2.0 * text.transformer.width * text_out,
        }

    def block_shape(self, block: nn.Module) -> tuple[int, int, int, int]:
        # head_dim is read, not derived from the width: a pruned layer keeps its head size with fewer
        # (possibly zero) heads; nn.MultiheadAttention and PrunableAttention both carry it
        attn = block.attn
        return attn.embed_dim, attn.num_heads, attn.head_dim, block.mlp.c_fc.out_features

    def gated_block(self, block: nn.Module, channel_group: int) -> PrunableBlock:
        return PrunableBlock.from_block(block, channel_group)

    def image_size(self, model: nn.Module) -> int:
        size = model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    def context_length(self, model: nn.Module) -> int:
        return int(_text(model).positional_embedding.shape[0])

    def build(self, model_cfg: dict) -> nn.Module:
        """An open_clip model from its config dict (`custom_text`: CustomTextCLIP). Only open_clip's own
        towers: a transformers text tower or a timm vision tower is refused before open_clip could fetch it."""
        import open_clip

        from ..storage import untrusted

        cfg = dict(model_cfg)
        if "multimodal_cfg" in cfg:
            raise HippError("CoCa models are not supported")
        untrusted.open_clip_cfg(cfg, "the open_clip model_cfg")  # for callers that did not check it already
        custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
        try:
            return (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**cfg)
        except (TypeError, ValueError, KeyError, AssertionError) as e:
            raise HippError(f"cannot build an open_clip model from this config: {e}") from None
