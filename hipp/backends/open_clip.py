"""open_clip backend: find the transformer blocks of each tower and describe the prune space."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import HippError
from ..space import LayerSpec, PruneSpace


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


def _block_shape(block: nn.Module) -> tuple[int, int, int]:
    attn = block.attn
    width = attn.embed_dim
    return width, attn.num_heads, block.mlp.c_fc.out_features


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(model: nn.Module, channel_group: int = 1) -> PruneSpace:
    """The prune space of an open_clip CLIP / CustomTextCLIP with ViT image tower."""
    blocks = tower_blocks(model)
    visual, text = model.visual, text_module(model)
    tokens = {"image": visual.positional_embedding.shape[0], "text": text.positional_embedding.shape[0]}
    layers = []
    for tower, resblocks in blocks.items():
        for i, block in enumerate(resblocks):
            width, heads, hidden = _block_shape(block)
            layers.append(LayerSpec(tower, i, width, heads, width // heads, hidden, tokens[tower], channel_group))
    conv = visual.conv1
    patches = tokens["image"] - 1
    embed_dim = visual.proj.shape[1] if visual.proj is not None else visual.transformer.width
    proj_text = text.text_projection
    text_out = (proj_text.out_features if isinstance(proj_text, nn.Linear)
                else proj_text.shape[1] if proj_text is not None else 0)
    fixed_flops = {
        "image": 2.0 * patches * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
        + (2.0 * visual.transformer.width * embed_dim if visual.proj is not None else 0.0),
        "text": 2.0 * text.transformer.width * text_out,
    }
    block_params = {t: sum(_count(b) for b in bl) for t, bl in blocks.items()}
    total = _count(model)
    fixed_params = {"image": float(_count(visual) - block_params["image"])}
    fixed_params["text"] = float(total - _count(visual) - block_params["text"])
    return PruneSpace(tuple(layers), fixed_flops, fixed_params)


def dense_flops(model: nn.Module) -> dict[str, float]:
    return {t: v for t, v in describe(model).dense_costs().items() if t.startswith("flops/")}


def num_params(model: nn.Module) -> int:
    return _count(model)


def image_size(model: nn.Module) -> int:
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def context_length(model: nn.Module) -> int:
    return int(text_module(model).positional_embedding.shape[0])
