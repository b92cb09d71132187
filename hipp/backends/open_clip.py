"""open_clip backend: where CLIP / CustomTextCLIP keep their blocks, and what lies outside them."""
from __future__ import annotations

from torch import nn

from ..errors import HippError
from .modules import PrunableBlock


def owns(model: nn.Module) -> bool:
    return hasattr(model, "visual") and hasattr(model, "encode_text")


def text_module(model: nn.Module) -> nn.Module:
    """CLIP keeps the text tower's parts on the model itself; CustomTextCLIP wraps them in .text."""
    return model.text if hasattr(model, "text") else model


def tower_blocks(model: nn.Module) -> dict[str, nn.ModuleList]:
    try:
        blocks = {"image": model.visual.transformer.resblocks,
                  "text": text_module(model).transformer.resblocks}
    except AttributeError:
        raise HippError(f"{type(model).__name__} is not an open_clip ViT CLIP model "
                        "(expected .visual.transformer and a text transformer)") from None
    return blocks


def block_shape(block: nn.Module) -> tuple[int, int, int, int]:
    # head_dim is read, not derived from the width: a pruned layer keeps its head size with fewer
    # (possibly zero) heads; nn.MultiheadAttention and PrunableAttention both carry it
    attn = block.attn
    return attn.embed_dim, attn.num_heads, attn.head_dim, block.mlp.c_fc.out_features


def tower_tokens(model: nn.Module) -> dict[str, int]:
    return {"image": model.visual.positional_embedding.shape[0],
            "text": text_module(model).positional_embedding.shape[0]}


def fixed_flops(model: nn.Module) -> dict[str, float]:
    """Matmul FLOPs outside the blocks: patch embedding and the two projections."""
    visual, text = model.visual, text_module(model)
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


def image_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.visual.parameters())


def image_size(model: nn.Module) -> int:
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def context_length(model: nn.Module) -> int:
    return int(text_module(model).positional_embedding.shape[0])


def gated_block(block: nn.Module, channel_group: int) -> PrunableBlock:
    return PrunableBlock.from_block(block, channel_group)


def build(model_cfg: dict) -> nn.Module:
    """An open_clip model from its config dict (`custom_text`: CustomTextCLIP). Only open_clip's own towers:
    a transformers text tower or a timm vision tower is refused before open_clip could fetch it."""
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
