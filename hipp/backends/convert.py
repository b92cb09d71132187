"""open_clip CLIP -> transformers CLIPModel folder: the embedded teacher on the transformers path.

The two implementations compute the same function for a plain ViT CLIP (class-token pooling,
argmax / end-token text pooling, pre-norm blocks without layer scale); anything else is refused
rather than converted approximately. The folder holds what `CLIPModel.from_pretrained` and
`AutoTokenizer.from_pretrained` read: config.json, model.safetensors, preprocessor_config.json and
the tokenizer (open_clip's BPE vocabulary and merges, under transformers' special-token names).
It is written in a hidden sibling and swapped into place (hipp.storage.outputs).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import HippError
from .hf import quiet

# open_clip calls its special tokens <start_of_text> / <end_of_text>; transformers' CLIP files use these
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# open_clip settings transformers' CLIP can take any value of; every other setting must keep open_clip's
# default (anything else changes the computation, or the tokenizer, in a way CLIPModel cannot express)
_FREE = {"vision_cfg": {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "patch_dropout"},
         "text_cfg": {"context_length", "width", "heads", "layers", "mlp_ratio"}}
COMMAND = "convert"
_TOP = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "cast_dtype"}


def _check_convertible(model_cfg: dict) -> None:
    from dataclasses import asdict

    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    extra = sorted(k for k in model_cfg if k not in _TOP and model_cfg[k] not in (None, False))
    if extra:
        raise HippError(f"open_clip model_cfg key {extra[0]!r} has no transformers CLIP equivalent "
                        "(only plain ViT CLIP models can be converted)")
    for name, cls in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg)):
        section, defaults = model_cfg.get(name, {}), asdict(cls())
        if not isinstance(section, dict):
            raise HippError(f"open_clip {name} must be a mapping")
        for key, value in section.items():
            if key in _FREE[name]:
                if key in ("layers", "image_size", "patch_size") and not isinstance(value, int):
                    raise HippError(f"open_clip {name}.{key}={value!r}: only square ViTs convert")
            elif key not in defaults or value != defaults[key]:
                raise HippError(f"open_clip {name}.{key}={value!r} has no transformers CLIP equivalent")


def clip_config(model_cfg: dict) -> dict:
    """transformers CLIPConfig arguments for an open_clip model_cfg (refusing what would not be equal)."""
    _check_convertible(model_cfg)
    vision, text = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {}))
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    vw, tw = vision.get("width", 768), text.get("width", 512)
    return {
        "projection_dim": model_cfg["embed_dim"],
        "vision_config": {"hidden_size": vw, "intermediate_size": int(vw * vision.get("mlp_ratio", 4.0)),
                          "num_attention_heads": vw // vision.get("head_width", 64),
                          "num_hidden_layers": vision.get("layers", 12), "image_size": vision.get("image_size", 224),
                          "patch_size": vision.get("patch_size", 16), "hidden_act": act, "layer_norm_eps": 1e-5},
        "text_config": {"hidden_size": tw, "intermediate_size": int(tw * text.get("mlp_ratio", 4.0)),
                        "num_attention_heads": text.get("heads", 8), "num_hidden_layers": text.get("layers", 12),
                        "max_position_embeddings": text.get("context_length", 77),
                        "vocab_size": 49408, "hidden_act": act, "layer_norm_eps": 1e-5,
                        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407},
    }


def _blocks(state: dict, src: str, dst: str, layers: int) -> dict:
    out = {}
    for i in range(layers):
        s, d = f"{src}.{i}.", f"{dst}.{i}."
        for part, w in zip(("q_proj", "k_proj", "v_proj"), state[s + "attn.in_proj_weight"].chunk(3)):
            out[d + f"self_attn.{part}.weight"] = w
        for part, b in zip(("q_proj", "k_proj", "v_proj"), state[s + "attn.in_proj_bias"].chunk(3)):
            out[d + f"self_attn.{part}.bias"] = b
        names = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for a, b in names.items():
            for p in ("weight", "bias"):
                out[d + f"{b}.{p}"] = state[s + f"{a}.{p}"]
    return out


def clip_state_dict(state: dict, layers: tuple[int, int]) -> dict:
    """open_clip CLIP state dict -> transformers CLIPModel state dict (same tensors, renamed / split)."""
    v, t = "vision_model.", "text_model."
    out = {
        v + "embeddings.class_embedding": state["visual.class_embedding"],
        v + "embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        v + "embeddings.position_embedding.weight": state["visual.positional_embedding"],
        v + "pre_layrnorm.weight": state["visual.ln_pre.weight"], v + "pre_layrnorm.bias": state["visual.ln_pre.bias"],
        v + "post_layernorm.weight": state["visual.ln_post.weight"],
        v + "post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].T,
        t + "embeddings.token_embedding.weight": state["token_embedding.weight"],
        t + "embeddings.position_embedding.weight": state["positional_embedding"],
        t + "final_layer_norm.weight": state["ln_final.weight"], t + "final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].T,
        "logit_scale": state["logit_scale"],
    }
    out.update(_blocks(state, "visual.transformer.resblocks", v + "encoder.layers", layers[0]))
    out.update(_blocks(state, "transformer.resblocks", t + "encoder.layers", layers[1]))
    return {k: w.detach().clone().contiguous() for k, w in out.items()}


def _used(layers: tuple[int, int]) -> set[str]:
    """Every open_clip key the conversion reads: a tensor outside this set would be dropped."""
    keys = {"visual.class_embedding", "visual.conv1.weight", "visual.positional_embedding", "visual.proj",
            "token_embedding.weight", "positional_embedding", "text_projection", "logit_scale"}
    keys |= {f"{m}.{p}" for m in ("visual.ln_pre", "visual.ln_post", "ln_final") for p in ("weight", "bias")}
    for prefix, n in (("visual.transformer.resblocks", layers[0]), ("transformer.resblocks", layers[1])):
        for i in range(n):
            keys |= {f"{prefix}.{i}.{m}.{p}" for m in ("attn.in_proj", "attn.out_proj", "ln_1", "ln_2", "mlp.c_fc",
                                                        "mlp.c_proj") for p in ("weight", "bias")}
    return {k.replace("attn.in_proj.weight", "attn.in_proj_weight").replace("attn.in_proj.bias", "attn.in_proj_bias")
            for k in keys}


def to_hf_clip(model: torch.nn.Module, model_cfg: dict):
    """A transformers CLIPModel holding the open_clip model's weights."""
    import transformers

    config = transformers.CLIPConfig(**clip_config(model_cfg))
    hf = transformers.CLIPModel(config).eval()
    layers = (config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers)
    source = {k: w.float() for k, w in model.state_dict().items() if k != "attn_mask"}  # the causal mask buffer
    left = sorted(set(source) - _used(layers))
    if left:
        raise HippError(f"open_clip tensor {left[0]!r} has no transformers CLIP counterpart; not converted")
    try:
        state = clip_state_dict(source, layers)
    except KeyError as e:
        raise HippError(f"open_clip tensor {e} missing; only plain ViT CLIP models can be converted") from None
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise HippError(f"conversion left {len(missing)} tensors unset and {len(unexpected)} unused "
                        f"(first: {(missing + unexpected)[0]})")
    return hf


def _tokenizer(folder: Path, context_length: int):
    """open_clip's BPE as a transformers CLIPTokenizer (vocab.json + merges.txt, then its own files)."""
    import transformers
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer()
    rename = {"<start_of_text>": BOS, "<end_of_text>": EOS}
    vocab = {rename.get(tok, tok): i for tok, i in simple.encoder.items()}
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                     bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
                                     model_max_length=context_length)
    tok.save_pretrained(str(folder))
    return tok


def _preprocessor(folder: Path, pp: dict, size: int) -> None:
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(pp["mean"]), "image_std": list(pp["std"]), "do_convert_rgb": True}, indent=1))


def convert_folder(src, out, overwrite: bool = False) -> dict:
    """Convert an open_clip model folder (the teacher's layout) into a transformers CLIP folder at `out`."""
    from ..storage import outputs
    from ..storage.checkpoint import CONFIG_NAME, load_model, preprocess_cfg
    from ..storage.fileio import read_json

    src, out = Path(src), Path(out)
    outputs.check(out, COMMAND, overwrite)
    if not (src / CONFIG_NAME).is_file():
        raise HippError(f"{src} is not an open_clip model folder (no {CONFIG_NAME})")
    model_cfg = read_json(src / CONFIG_NAME).get("model_cfg")
    if not isinstance(model_cfg, dict):
        raise HippError(f"{src / CONFIG_NAME} has no model_cfg mapping")
    _check_convertible(model_cfg)  # before any weights are read
    model = load_model(src, expect="open_clip")
    hf = to_hf_clip(model, model_cfg)
    pp = preprocess_cfg(model)
    with outputs.claim(out, COMMAND, overwrite), outputs.staged(out, COMMAND) as stage:
        with quiet():
            hf.save_pretrained(str(stage))
        _tokenizer(stage, hf.config.text_config.max_position_embeddings)
        _preprocessor(stage, pp, hf.config.vision_config.image_size)
        files = sorted(os.listdir(stage))
    return {"out": str(out), "files": files,
            "num_params": sum(p.numel() for p in hf.parameters())}
