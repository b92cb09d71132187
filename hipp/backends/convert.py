"""open_clip CLIP -> transformers CLIPModel folder: the embedded teacher on the transformers path.

The two implementations compute the same function for a plain ViT CLIP (class-token pooling,
argmax / end-token text pooling, pre-norm blocks without layer scale); anything else is refused
rather than converted approximately. The folder holds what `CLIPModel.from_pretrained` and
`AutoTokenizer.from_pretrained` read: config.json, model.safetensors, preprocessor_config.json and
the tokenizer (open_clip's BPE vocabulary and merges, under transformers' special-token names).
It is written in a hidden sibling and renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import HippError
from .hf import quiet

# open_clip calls its special tokens <start_of_text> / <end_of_text>; transformers' CLIP files use these
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_UNSUPPORTED = {  # open_clip config keys whose non-default values transformers' CLIP cannot express
    "vision_cfg": {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False, "pool_type": "tok",
                   "final_ln_after_pool": False, "output_tokens": False, "act_kwargs": None, "norm_kwargs": None},
    "text_cfg": {"ls_init_value": None, "pool_type": "argmax", "proj_bias": False, "no_causal_mask": False,
                 "embed_cls": False, "pad_id": 0, "final_ln_after_pool": False, "hf_model_name": None},
}


def clip_config(model_cfg: dict) -> dict:
    """transformers CLIPConfig arguments for an open_clip model_cfg (refusing what would not be equal)."""
    vision, text = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {}))
    for name, section in (("vision_cfg", vision), ("text_cfg", text)):
        for key, default in _UNSUPPORTED[name].items():
            if section.get(key, default) != default:
                raise HippError(f"open_clip {name}.{key}={section[key]!r} has no transformers CLIP equivalent")
    if model_cfg.get("custom_text") or "multimodal_cfg" in model_cfg:
        raise HippError("only open_clip CLIP models (no custom text tower, no CoCa) can be converted")
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
                        "vocab_size": text.get("vocab_size", 49408), "hidden_act": act, "layer_norm_eps": 1e-5,
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


def to_hf_clip(model: torch.nn.Module, model_cfg: dict):
    """A transformers CLIPModel holding the open_clip model's weights."""
    import transformers

    config = transformers.CLIPConfig(**clip_config(model_cfg))
    hf = transformers.CLIPModel(config).eval()
    layers = (config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers)
    state = clip_state_dict({k: w.float() for k, w in model.state_dict().items()}, layers)
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


def convert_folder(src, out) -> dict:
    """Convert an open_clip model folder (the teacher's layout) into a transformers CLIP folder at `out`."""
    from ..checkpoint import CONFIG_NAME, load_model, preprocess_cfg
    from ..fileio import read_json

    src, out = Path(src), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HippError(f"--out {out} exists and is not an empty folder")
    if not (src / CONFIG_NAME).is_file():
        raise HippError(f"{src} is not an open_clip model folder (no {CONFIG_NAME})")
    model = load_model(src, expect="open_clip")
    model_cfg = read_json(src / CONFIG_NAME)["model_cfg"]
    hf = to_hf_clip(model, model_cfg)
    pp = preprocess_cfg(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".convert-tmp", dir=out.parent))
    try:
        with quiet():
            hf.save_pretrained(str(stage))
        _tokenizer(stage, hf.config.text_config.max_position_embeddings)
        _preprocessor(stage, pp, hf.config.vision_config.image_size)
        if out.exists():
            out.rmdir()
        os.rename(stage, out)
    except OSError as e:
        raise HippError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {"out": str(out), "files": sorted(os.listdir(out)),
            "num_params": sum(p.numel() for p in hf.parameters())}
