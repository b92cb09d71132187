"""transformers backend: CLIPModel and SiglipModel, both towers, with the project's gates.

`HFVLM` puts a transformers model behind the contrastive task's `DualEncoder` interface
(encode_image / encode_text / logit_scale, base.py) plus the preprocess_cfg storage keeps; `HFBackend`
is the family's registered Backend. `HFAttention`, `HFMLP` and `HFBlock`
take the place of CLIPEncoderLayer / SiglipEncoderLayer under transformers' own names (q_proj,
k_proj, v_proj, out_proj, fc1, fc2, layer_norm1, layer_norm2), so state dicts load unchanged; all
the gate arithmetic is inherited from modules.py. Attention itself runs through transformers'
attention functions, so masks, causality and the chosen implementation (sdpa / eager) are the
model's own. SigLIP's vision attention-pooling head stays dense.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..storage import untrusted
from ..errors import HippError
from .base import Backend, DualEncoder, Stage, register
from .modules import GatedBlock, HeadGatedAttention, PrunableMLP, linear_from, out_columns

MODEL_TYPES = ("clip", "siglip")


class HFVLM(nn.Module, DualEncoder):
    """A transformers CLIPModel / SiglipModel as a DualEncoder (base.py), the interface the contrastive
    task code calls; open_clip's CLIP has it natively, so both families run the same task code."""

    def __init__(self, hf: nn.Module, preprocess_cfg: dict | None = None):
        super().__init__()
        if getattr(hf.config, "model_type", None) == "siglip" and not hf.config.vision_config.vision_use_head:
            raise HippError("SigLIP without its vision pooling head (vision_use_head=False) has no image embedding")
        self.hf = hf
        self.preprocess_cfg = dict(preprocess_cfg or {})

    @property
    def model_type(self) -> str:
        return self.hf.config.model_type

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.hf.logit_scale

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return _features(self.hf.get_image_features(pixel_values=pixel_values, return_dict=True), normalize)

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        # no attention mask: CLIP text is causal (padding after the end token cannot reach it) and
        # SigLIP was trained on max-length padding without one
        return _features(self.hf.get_text_features(input_ids=input_ids, return_dict=True), normalize)


def _features(out, normalize: bool) -> torch.Tensor:
    feats = out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns an output object
    return F.normalize(feats, dim=-1) if normalize else feats


class HFAttention(HeadGatedAttention):
    """transformers' self-attention (separate q / k / v / out projections) with any number of heads."""

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, out_proj: nn.Linear,
                 head_dim: int, config, dropout: float = 0.0):
        super().__init__()
        # registration order = transformers', so even the order of state_dict keys is unchanged
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = k_proj, v_proj, q_proj, out_proj
        self.embed_dim, self.head_dim = out_proj.out_features, head_dim
        self.num_heads = q_proj.out_features // head_dim
        self.scale, self.dropout, self.is_causal = head_dim ** -0.5, dropout, False
        self.config = config  # transformers' attention functions read the chosen implementation here
        self._init_gates()

    @classmethod
    def from_attention(cls, attn: nn.Module) -> "HFAttention":
        """Wrap a CLIPAttention / SiglipAttention, sharing (not copying) its parameters."""
        return cls(attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, attn.head_dim, attn.config, attn.dropout)

    @property
    def qkv_weight(self) -> torch.Tensor:
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])

    @property
    def qkv_bias(self) -> torch.Tensor | None:
        if self.q_proj.bias is None:
            return None
        return torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])

    def heads_out(self, x: torch.Tensor, attn_mask=None, **kwargs) -> torch.Tensor:
        shape = (*x.shape[:-1], self.num_heads, self.head_dim)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _eager)
        out, _ = attend(self, q, k, v, attn_mask, scaling=self.scale,
                        dropout=self.dropout if self.training else 0.0, **kwargs)
        self.record_cls(q, k)
        return out  # [B, T, H, hd]: transformers' attention functions return it transposed

    def keep_heads(self, heads: torch.Tensor) -> "HFAttention":
        hd = self.head_dim
        heads = heads.to(self.q_proj.weight.device)
        rows = (heads[:, None] * hd + torch.arange(hd, device=heads.device)).flatten()
        grad = self.q_proj.weight.requires_grad
        q, k, v = (linear_from(p.weight.detach()[rows], None if p.bias is None else p.bias.detach()[rows], grad)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        ow, ob = out_columns(self.out_proj, heads, hd)
        return HFAttention(q, k, v, linear_from(ow, ob, grad), hd, self.config, self.dropout)


def _eager(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, is_causal=None,
           **kwargs):
    """Plain attention for when transformers has no function for the configured implementation."""
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is None and is_causal:
        t = weights.shape[-1]
        attention_mask = torch.full((t, t), float("-inf"), device=weights.device, dtype=weights.dtype).triu(1)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.dropout(weights.softmax(-1, dtype=torch.float32).to(query.dtype), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class HFMLP(PrunableMLP):
    NAMES = ("fc1", "activation_fn", "fc2")


class HFBlock(GatedBlock):
    """CLIPEncoderLayer / SiglipEncoderLayer with head, channel and layer gates."""

    PARTS = ("self_attn", "layer_norm1", "mlp", "layer_norm2")

    def __init__(self, parts: dict[str, nn.Module]):
        """`parts`: the four PARTS in the original layer's registration order (CLIP and SigLIP differ),
        so even the order of state_dict keys is unchanged."""
        super().__init__()
        for name, module in parts.items():
            setattr(self, name, module)
        self._init_gates()

    @property
    def attn(self) -> HFAttention:
        return self.self_attn

    @classmethod
    def from_layer(cls, layer: nn.Module, channel_group: int = 1) -> "HFBlock":
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if set(layer._modules) != set(cls.PARTS) or not hasattr(attn, "q_proj") or not hasattr(mlp, "fc1"):
            raise ValueError("expected a CLIP / SigLIP encoder layer (q/k/v/out_proj attention, fc1/fc2 MLP)")
        swap = {"self_attn": HFAttention.from_attention(attn),
                "mlp": HFMLP(mlp.fc1, mlp.activation_fn, mlp.fc2, channel_group)}
        return cls({name: swap.get(name, module) for name, module in layer._modules.items()})

    def with_units(self, attn: HFAttention, mlp: HFMLP) -> "HFBlock":
        swap = {"self_attn": attn, "mlp": mlp}
        return HFBlock({name: swap[name] if name in swap else copy.deepcopy(module) for name, module in self._modules.items()})

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        x = self.residual(hidden_states, self.branch(hidden_states, self.layer_norm1, self.self_attn,
                                                     attention_mask, **kwargs))
        return self.residual(x, self.branch(x, self.layer_norm2, self.mlp))


# --- the backend ---

def _count(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@register
class HFBackend(Backend):
    name = "hf"

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, HFVLM)

    def blocks(self, model: HFVLM) -> dict[str, nn.ModuleList]:
        return {"image": model.hf.vision_model.encoder.layers, "text": model.hf.text_model.encoder.layers}

    def stages(self, model: HFVLM) -> dict[str, Stage]:
        blocks, flops, hf = self.blocks(model), self._fixed_flops(model), model.hf
        # the image stage owns CLIP's visual projection; the text stage is everything else
        image = _count(hf.vision_model)
        if hasattr(hf, "visual_projection"):  # CLIP
            image += hf.visual_projection.weight.numel()
        params = {"image": image - _count(*blocks["image"]), "text": _count(model) - image - _count(*blocks["text"])}
        tokens = {"image": hf.vision_model.embeddings.num_positions, "text": self.context_length(model)}
        return {s: Stage(blocks[s], tokens[s], flops[s], params[s]) for s in blocks}

    def token_levels(self, model: HFVLM, rule: str | None = None) -> tuple:
        """CLIP's patches after a quarter of the image layers (SigLIP has no class token to rank by)."""
        if not hasattr(model.hf, "visual_projection"):
            return ()
        from . import tower_tokens
        blocks = self.blocks(model)["image"]
        return (tower_tokens.level("image", blocks, model.hf.vision_model.embeddings.num_positions,
                                   tower_tokens.default_after(len(blocks)), self.block_shape(blocks[0])[2]),)

    @staticmethod
    def _fixed_flops(model: HFVLM) -> dict[str, float]:
        """Matmul FLOPs outside the blocks: patch embedding, projections, SigLIP's pooling head."""
        hf = model.hf
        emb = hf.vision_model.embeddings
        conv = emb.patch_embedding
        d_img = conv.out_channels
        patches = emb.num_patches
        image = 2.0 * patches * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * d_img
        if hasattr(hf, "visual_projection"):  # CLIP
            image += 2.0 * d_img * hf.visual_projection.out_features
            text = 2.0 * hf.text_projection.in_features * hf.text_projection.out_features
        else:  # SigLIP: the text head, and the vision attention-pooling head (one query over all patches)
            head = hf.text_model.head
            text = 2.0 * head.in_features * head.out_features
            if getattr(hf.vision_model, "use_head", False):
                pool = hf.vision_model.head
                hidden = pool.mlp.fc1.out_features
                t = emb.num_positions
                image += 2.0 * (2 * d_img * d_img + 2 * t * d_img * d_img + 2 * t * d_img + 2 * d_img * hidden)
        return {"image": image, "text": text}

    def block_shape(self, block: nn.Module) -> tuple[int, int, int, int]:
        attn = block.attn if isinstance(block, GatedBlock) else block.self_attn
        return attn.embed_dim, attn.num_heads, attn.head_dim, block.mlp.fc1.out_features

    def gated_block(self, block: nn.Module, channel_group: int) -> HFBlock:
        return HFBlock.from_layer(block, channel_group)

    def image_size(self, model: HFVLM) -> int:
        return _image_size(model.hf)

    def context_length(self, model: HFVLM) -> int:
        return int(model.hf.config.text_config.max_position_embeddings)

    def build(self, model_cfg: dict) -> HFVLM:
        """A model with fresh weights from a transformers config dict (model_type clip or siglip)."""
        import transformers

        kind = model_cfg.get("model_type")
        if kind not in MODEL_TYPES:
            raise HippError(f"transformers model_type {kind!r} is not supported; expected one of {MODEL_TYPES}")
        untrusted.transformers_config(model_cfg, "the transformers config")
        config_cls, model_cls = ((transformers.CLIPConfig, transformers.CLIPModel) if kind == "clip"
                                 else (transformers.SiglipConfig, transformers.SiglipModel))
        try:
            config = config_cls.from_dict({k: v for k, v in model_cfg.items() if k != "model_type"})
            hf = model_cls(config)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise HippError(f"cannot build a transformers {kind} model from this config: {e}") from None
        return HFVLM(hf)

    def rebind(self, model: HFVLM) -> None:
        """Point every attention at its own model's tower config (slicing copies kept the original's), so
        the attention implementation chosen on this model is the one its blocks use."""
        for tower, blocks in self.blocks(model).items():
            config = (model.hf.vision_model if tower == "image" else model.hf.text_model).config
            for block in blocks:
                if isinstance(block, HFBlock):
                    block.attn.config = config


def _image_size(hf: nn.Module) -> int:
    return int(hf.config.vision_config.image_size)


# --- folders and hub ids ---

HF_CONFIG = "config.json"
HF_PREPROCESSOR = "preprocessor_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "spiece.model", "added_tokens.json")
_DEFAULT_STATS = {"clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
                  "siglip": ([0.5] * 3, [0.5] * 3)}


def folder_model_type(path) -> str | None:
    """model_type of a transformers folder (config.json), or None when the folder is not one."""
    from pathlib import Path

    from ..storage.fileio import read_json

    cfg = Path(path) / HF_CONFIG
    return read_json(cfg).get("model_type") if cfg.is_file() else None


def load_options(spec) -> dict:
    """from_pretrained keywords: never code from the checkpoint, and a local folder never reaches the hub
    (a hub id the user names is still taken from the cache, else the hub)."""
    from pathlib import Path

    return {"trust_remote_code": False, **({"local_files_only": True} if Path(str(spec)).is_dir() else {})}


def _check_folder(spec, need_config: bool = True) -> None:
    """A local folder's files checked before transformers reads any of them (hipp/untrusted.py)."""
    from pathlib import Path

    if Path(str(spec)).is_dir():
        untrusted.transformers_folder(Path(str(spec)), need_config)


def load(spec: str, expect: str | None = None) -> HFVLM:
    """A CLIPModel / SiglipModel from a local folder or a hub id (local cache, else the hub), safetensors only."""
    import transformers

    _check_folder(spec)
    options = load_options(spec)
    try:
        config = transformers.AutoConfig.from_pretrained(spec, **options)
    except Exception as e:  # unreachable hub, missing cache, bad JSON: one line for the user
        raise HippError(f"cannot load the transformers config of {spec!r} (no local copy and the hub is "
                        f"unreachable, or not a model): {_first_line(e)}") from None
    kind = config.model_type
    if kind not in MODEL_TYPES:
        raise HippError(f"{spec} is a transformers {kind!r} model; HiPP prunes clip and siglip")
    untrusted.loaded_attention(config, spec)  # a hub id's config.json was not checked as a file
    if expect is not None and kind != expect:
        raise HippError(f"{spec} is a {kind} checkpoint, but {expect} was asked for")
    cls = transformers.CLIPModel if kind == "clip" else transformers.SiglipModel
    try:
        with quiet():
            hf = cls.from_pretrained(spec, config=config, use_safetensors=True, dtype=torch.float32, **options)
    except Exception as e:
        raise HippError(f"cannot load the {kind} weights of {spec!r}: {_first_line(e)}") from None
    return HFVLM(hf, preprocess_from(spec, kind, _image_size(hf)))


@contextlib.contextmanager
def quiet():
    """No transformers progress bars (per-tensor bars for a load or save of a second)."""
    from transformers.utils import logging

    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            logging.enable_progress_bar()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def preprocess_from(spec, kind: str, size: int) -> dict:
    """The project's preprocess dict (open_clip's keys) from a preprocessor_config.json, if there is one."""
    import transformers

    mean, std = _DEFAULT_STATS[kind]
    # CLIP resizes the short side and crops the centre; SigLIP squashes to the square size
    pp = {"size": size, "mean": mean, "std": std, "interpolation": "bicubic",
          "resize_mode": "shortest" if kind == "clip" else "squash"}
    try:
        raw = transformers.AutoImageProcessor.from_pretrained(spec, **load_options(spec)).to_dict()
    except Exception:  # none shipped: the family's defaults
        return pp
    pp["mean"], pp["std"] = list(raw.get("image_mean", mean)), list(raw.get("image_std", std))
    pp["interpolation"] = {2: "bilinear", 3: "bicubic"}.get(raw.get("resample"), pp["interpolation"])
    if "do_center_crop" in raw:
        pp["resize_mode"] = "shortest" if raw["do_center_crop"] else "squash"
    return pp


class HFTokenizer:
    """transformers tokenizer -> [N, context_length] input ids, padded to full length like open_clip's."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, texts) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.context_length,
                              return_tensors="pt")["input_ids"]


def tokenizer(spec, context: int | None = None) -> HFTokenizer:
    """The tokenizer of a folder or hub id; `context` defaults to the model's max_position_embeddings."""
    import transformers

    _check_folder(spec, need_config=context is None)  # an export has no config.json, only tokenizer files
    options = load_options(spec)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(spec), **options)
        if context is None:
            context = transformers.AutoConfig.from_pretrained(str(spec), **options).text_config.max_position_embeddings
    except Exception as e:
        raise HippError(f"cannot load the tokenizer of {spec}: {_first_line(e)}") from None
    return HFTokenizer(tok, context)
