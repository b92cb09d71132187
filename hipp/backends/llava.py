"""LLaVA backend: transformers' LlavaForConditionalGeneration, vision tower and language model under one plan.

Two stages: "vision", the CLIP (or SigLIP) vision tower's encoder layers as hf.py's HFBlock, and
"language", the decoder layers as decoder.py's DecoderBlock (key/value groups, SwiGLU channels).
The projector and the patch embedding are the vision stage's fixed costs; token embeddings, the final
norm and lm_head the language stage's.

Tokens per stage: the vision tower's positions (patches, plus CLIP's class token) for one image; for
the language model, one prefill of a declared prompt length, the image tokens included: the config's
`hipp_prompt_tokens` when set, else the image tokens plus DEFAULT_TEXT_TOKENS. lm_head is priced
for one position, the next-token logits a generation's prefill computes.

Two transformers mechanisms outlive a block swap and are kept right here: hidden states are recorded
by hooks on transformers' layer classes (LLaVA takes its image features from them), installed before
any swap so that modules.carry_hooks moves them to the gated, shrunk or dropped blocks; and the KV
cache's length is read from its layer 0, so a materialised model numbers the layers that still
attend 0, 1, ... (rebind), and a dropped or emptied first layer leaves the positions right.
"""
from __future__ import annotations

import sys

from torch import nn

from ..errors import HippError
from ..storage import untrusted
from . import llava_tokens
from .base import Backend, Stage, register
from .token_rank import installed, row_flops
from .decoder import DecoderBlock
from .hf import HFBlock
from .modules import DroppedBlock, GatedBlock

DEFAULT_TEXT_TOKENS = 32  # text tokens of a prompt besides the image's, unless the config declares the prompt


def _is_llava(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # a model of it exists only once it is imported
    return transformers is not None and isinstance(model, transformers.LlavaForConditionalGeneration)


def _count(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _capture_hooks(*models: nn.Module) -> None:
    """Install transformers' output-recording hooks now, while the layers are still its own classes."""
    from transformers.utils.output_capturing import maybe_install_capturing_hooks

    for m in models:
        maybe_install_capturing_hooks(m)


@register
class LlavaBackend(Backend):
    name = "llava"

    def owns(self, model: nn.Module) -> bool:
        return _is_llava(model)

    def blocks(self, model: nn.Module) -> dict[str, nn.ModuleList]:
        inner = model.model
        _capture_hooks(inner.vision_tower, inner.language_model)  # a flag check after the first call
        return {"vision": llava_tokens.vision(model).encoder.layers, "language": inner.language_model.layers}

    image_tokens = staticmethod(llava_tokens.image_tokens)

    def stages(self, model: nn.Module) -> dict[str, Stage]:
        blocks, inner = self.blocks(model), model.model
        emb = llava_tokens.vision(model).embeddings
        conv, projector = emb.patch_embedding, inner.multi_modal_projector
        image = self.image_tokens(model)
        kh, kw = conv.kernel_size
        patch_flops = 2.0 * emb.num_patches * conv.in_channels * kh * kw * conv.out_channels
        proj_flops = 2.0 * image * sum(lin.in_features * lin.out_features
                                       for lin in (projector.linear_1, projector.linear_2))
        head = model.lm_head
        vision_params = _count(inner.vision_tower, projector)
        params = {"vision": vision_params - _count(*blocks["vision"]),
                  "language": _count(model) - vision_params - _count(*blocks["language"])}
        flops = {"vision": patch_flops + proj_flops, "language": 2.0 * head.in_features * head.out_features}
        tokens = {"vision": emb.num_positions, "language": self.context_length(model)}
        budget = installed(model)
        if budget is not None and budget.after < 0:  # pruned before the language model: it costs what it runs
            # (after a language layer, describe() shortens the later layers)
            shed = budget.of - budget.kept
            tokens["language"] -= shed
            flops["vision"] -= proj_flops * shed / image
            attn = llava_tokens.rank_attention(model, budget.layer)
            if attn is not None:
                flops["vision"] += row_flops(attn.num_heads, attn.head_dim, emb.num_positions)
        return {s: Stage(blocks[s], tokens[s], flops[s], params[s]) for s in blocks}

    def block_shape(self, block: nn.Module) -> tuple[int, int, int, int]:
        if DecoderBlock.is_decoder_layer(block):
            attn = block.self_attn
            hd = attn.head_dim
            return attn.o_proj.out_features, attn.k_proj.out_features // hd, hd, block.mlp.gate_proj.out_features
        attn = block.attn if isinstance(block, GatedBlock) else block.self_attn
        return attn.embed_dim, attn.num_heads, attn.head_dim, block.mlp.fc1.out_features

    def layer_fields(self, block: nn.Module) -> dict:
        if not DecoderBlock.is_decoder_layer(block):
            return {}
        attn, mlp = block.self_attn, block.mlp
        heads, kv_heads = (p.out_features // attn.head_dim for p in (attn.q_proj, attn.k_proj))
        has = lambda m: int(getattr(m, "bias", None) is not None)  # noqa: E731
        return {"group_size": heads // kv_heads if kv_heads else 1, "qkv_bias": has(attn.q_proj),
                "out_bias": has(attn.o_proj), "mlp_gated": 1, "mlp_bias": has(mlp.gate_proj),
                "norm_bias": has(block.input_layernorm)}

    def gated_block(self, block: nn.Module, channel_group: int) -> GatedBlock:
        if DecoderBlock.is_decoder_layer(block):
            return DecoderBlock.from_layer(block, channel_group)
        return HFBlock.from_layer(block, channel_group)

    def token_levels(self, model: nn.Module, rule: str | None = None) -> tuple:
        """Image tokens ranked by the prompt's last token after an early language layer ("text", the
        default: on validation it kept far more utility at the same FLOPs, docs/studies/visual-tokens.md)
        or by the vision tower's class token before the language model ("cls")."""
        if rule == "cls":
            return (llava_tokens.token_level(model),)
        from . import decoder_tokens
        return (decoder_tokens.level(model),)

    def image_size(self, model: nn.Module) -> int:
        return int(model.config.vision_config.image_size)

    def context_length(self, model: nn.Module) -> int:
        """The declared prompt length of the language stage, image tokens included."""
        declared = getattr(model.config, "hipp_prompt_tokens", None)
        if declared is None:
            return self.image_tokens(model) + DEFAULT_TEXT_TOKENS
        if isinstance(declared, bool) or not isinstance(declared, int) or declared < self.image_tokens(model):
            raise HippError(f"hipp_prompt_tokens must be a whole number of at least the {self.image_tokens(model)} "
                            f"image tokens, got {declared!r}")
        return declared

    def build(self, model_cfg: dict) -> nn.Module:
        """A LlavaForConditionalGeneration with fresh weights from a transformers config dict."""
        import transformers

        if model_cfg.get("model_type") != "llava":
            raise HippError(f"transformers model_type {model_cfg.get('model_type')!r} is not llava")
        untrusted.transformers_config(model_cfg, "the transformers config")
        try:
            config = transformers.LlavaConfig.from_dict({k: v for k, v in model_cfg.items() if k != "model_type"})
            return transformers.LlavaForConditionalGeneration(config).eval()
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise HippError(f"cannot build a transformers llava model from this config: {e}") from None

    def rebind(self, model: nn.Module) -> None:
        """Point copied blocks at this model's configs, and number the decoder layers that still
        attend 0, 1, ...: the KV cache reads the sequence length from its layer 0, which a dropped
        or emptied layer would leave empty."""
        blocks = self.blocks(model)
        vision_cfg = llava_tokens.vision(model).config
        for block in blocks["vision"]:
            if isinstance(block, HFBlock):
                block.attn.config = vision_cfg
        text_cfg, n = model.model.language_model.config, 0
        # a cache built from the config gives layer j the type of layer_types[j]; with sliding and full
        # layers mixed, renumbering would hand a layer another's type, so there the indices stay
        types = getattr(text_cfg, "layer_types", None)
        renumber = not types or len(set(types)) == 1
        for i, block in enumerate(blocks["language"]):
            if isinstance(block, DroppedBlock) or not isinstance(block, DecoderBlock):
                continue
            block.attn.config = text_cfg
            if not renumber:
                block.attn.layer_idx = i
            elif not block.attn.empty:
                block.attn.layer_idx, n = n, n + 1


def load(path) -> nn.Module:
    """A LlavaForConditionalGeneration from a local folder save_pretrained wrote (safetensors only),
    its files checked first (storage/untrusted.py); never code from the folder, never the hub. The
    project's preprocess dict rides on the model (`preprocess_cfg`), as on the other families."""
    import torch
    import transformers

    from .hf import _first_line, load_options, preprocess_from, quiet

    untrusted.transformers_folder(path)
    options = load_options(path)
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), **options)
    except Exception as e:  # bad JSON, unknown sub-config: one line
        raise HippError(f"cannot read the transformers config of {path}: {_first_line(e)}") from None
    if config.model_type != "llava":
        raise HippError(f"{path} is a transformers {config.model_type!r} model, not llava")
    untrusted.loaded_attention(config, path)
    try:
        with quiet():
            model = transformers.LlavaForConditionalGeneration.from_pretrained(
                str(path), config=config, use_safetensors=True, dtype=torch.float32, **options)
    except Exception as e:
        raise HippError(f"cannot load the llava weights of {path}: {_first_line(e)}") from None
    # the vision tower's processor statistics when the folder ships them, else CLIP's
    model.preprocess_cfg = preprocess_from(path, "clip", int(config.vision_config.image_size))
    return model
