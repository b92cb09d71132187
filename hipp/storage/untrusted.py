"""What HiPP accepts from a model folder, checked before open_clip or transformers reads it.

A model folder, an export or a transformers checkpoint is data. Yet both libraries import code,
fetch from the hub or open other files when a config key asks them to: `auto_map` and
`trust_remote_code`, open_clip's `hf_tokenizer_name`, `hf_model_name` and `timm_model_name`, a
`vocab_file` or `bpe_path`, an attention kernel named by its hub repository, a sharded weight index
pointing elsewhere. So every config HiPP hands them is checked here first, and every refusal is one
line (a HippError): remote code, another location, or something HiPP does not build.

open_clip configs are held to an allow-list: the keys of open_clip's own ViT and text transformer,
the only towers HiPP builds. transformers configs carry too many version-dependent keys for that, so
there the keys that make transformers load something must hold a value known to stay local: the
CLIP / SigLIP model, tokenizer and image-processor classes, eager or sdpa attention, file names
inside the folder.

Symbolic links inside a folder are left alone: a Hugging Face cache snapshot, a folder users may
well give, holds nothing but links into the cache's blob store.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import HippError
from .fileio import read_json

# --- refusals ---

def _show(value, limit: int = 80) -> str:
    """A config value in a message: quoted, escaped onto one line, and short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def remote_code(where, what: str) -> HippError:
    return HippError(f"{where} asks for remote code ({what}); HiPP never runs code from a model folder")


def elsewhere(where, what: str, value) -> HippError:
    return HippError(f"{where} names another location {_show(value)} ({what}); "
                     "HiPP loads only the files inside the folder")


def _walk(obj, prefix: str = ""):
    """(dotted name, key, value) for every key of nested mappings, lists included."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            yield repr(name)[1:-1], key, value  # escaped: a key may hold a newline
            yield from _walk(value, name)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _walk(value, f"{prefix}[{i}]")


# keys through which transformers imports code shipped with a folder or a hub repository (open_clip
# hands its text_cfg.tokenizer_kwargs, trust_remote_code included, to AutoTokenizer)
_CODE_KEYS = ("auto_map", "custom_pipelines", "trust_remote_code")


def no_remote_code(config: dict, where) -> None:
    for name, key, value in _walk(config):
        if key in _CODE_KEYS and value:
            raise remote_code(where, name)


def _mapping(value, where, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HippError(f"{where}: {what} must be a mapping, not {_show(value)}")
    return value


def _only(section: dict, allowed, where, what: str) -> None:
    unknown = sorted(str(k) for k in section if k not in allowed)
    if unknown:
        raise HippError(f"{where}: {what} key {_show(unknown[0])} is not one HiPP builds "
                        "(open_clip's own ViT and text transformer towers)")


# --- open_clip: model_cfg of open_clip_config.json, and of an open_clip export's pruned_config.json ---

_OC_TOP = frozenset({"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
                     "nonscalar_logit_scale", "cast_dtype", "output_dict", "custom_text"})
_OC_TOWER = frozenset({"width", "layers", "mlp_ratio", "ls_init_value", "act_kwargs", "norm_kwargs",
                       "final_ln_after_pool", "pool_type", "output_tokens", "block_type", "qk_norm",
                       "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc"})
_OC_VISION = _OC_TOWER | {
    "head_width", "patch_size", "image_size", "patch_dropout", "attentional_pool", "attn_pooler_queries",
    "attn_pooler_heads", "no_ln_pre", "pos_embed_type",
    # read by open_clip only for a timm tower, which a timm_model_name would ask for (checked on its own)
    "timm_model_name", "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
    "timm_drop_path"}
_OC_TEXT = _OC_TOWER | {
    "context_length", "vocab_size", "heads", "embed_cls", "pad_id", "eos_id", "no_causal_mask", "proj_bias",
    "proj_type", "tokenizer_kwargs",
    # read only for a transformers tokenizer or text tower, which the names would ask for (checked on their own)
    "hf_tokenizer_name", "tokenizer_mode", "hf_model_name", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}

# open_clip's SimpleTokenizer keywords and the values that keep it on its bundled vocabulary, offline
_CLEAN = ("lower", "whitespace", "canonicalize")
_MASKS = ("", "simple", "random", "shuffle")  # 'syntax' has NLTK download its models first
_TOKENIZER_KWARGS = {
    "clean": lambda v: v in _CLEAN,
    "reduction_mask": lambda v: v in _MASKS,
    "additional_special_tokens": lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
}


def open_clip_cfg(model_cfg, where) -> dict:
    """An open_clip model_cfg that builds only open_clip's own towers and tokenizer, from the folder alone."""
    model_cfg = _mapping(model_cfg, where, "model_cfg")
    no_remote_code(model_cfg, where)
    vision = _mapping(model_cfg.get("vision_cfg"), where, "vision_cfg")
    text = _mapping(model_cfg.get("text_cfg"), where, "text_cfg")
    _no_other_towers(vision, text, where)
    tokenizer_kwargs(text.get("tokenizer_kwargs"), where)
    _only(model_cfg, _OC_TOP, where, "model_cfg")
    _only(vision, _OC_VISION, where, "vision_cfg")
    _only(text, _OC_TEXT, where, "text_cfg")
    return model_cfg


def _no_other_towers(vision: dict, text: dict, where) -> None:
    if text.get("hf_model_name"):  # transformers reads its config, and with hf_model_pretrained its weights
        raise elsewhere(where, "text_cfg.hf_model_name", text["hf_model_name"])
    timm = vision.get("timm_model_name")
    if timm and (vision.get("timm_model_pretrained") or ":" in str(timm)):  # weights or an hf-hub: config
        raise elsewhere(where, "vision_cfg.timm_model_name", timm)
    if timm:
        raise HippError(f"{where} asks for a timm vision tower {_show(timm)} (vision_cfg.timm_model_name); "
                        "HiPP builds open_clip's own ViT only")
    if text.get("hf_tokenizer_name"):  # AutoTokenizer over the folder: a transformers tokenizer and its config
        raise HippError(f"{where} asks for a transformers tokenizer {_show(text['hf_tokenizer_name'])} "
                        "(text_cfg.hf_tokenizer_name); HiPP reads an open_clip folder with open_clip's own tokenizer")


def tokenizer_kwargs(kwargs, where) -> dict:
    """text_cfg.tokenizer_kwargs as open_clip's SimpleTokenizer takes them, without another vocabulary file."""
    kwargs = _mapping(kwargs, where, "text_cfg.tokenizer_kwargs")
    for key, value in kwargs.items():
        what = f"text_cfg.tokenizer_kwargs.{key}"
        if key == "bpe_path":
            raise elsewhere(where, what, value)
        if key == "reduction_mask" and value == "syntax":
            raise HippError(f"{where} asks open_clip's tokenizer to download NLTK models ({what} 'syntax'); "
                            "HiPP loads only the files inside the folder")
        if key not in _TOKENIZER_KWARGS or not _TOKENIZER_KWARGS[key](value):
            raise HippError(f"{where}: {_show(what)}={_show(value)} is not a setting HiPP passes to open_clip's "
                            f"tokenizer (clean one of {_CLEAN}, reduction_mask one of {_MASKS}, "
                            "additional_special_tokens a list of strings)")
    return kwargs


def preprocess_cfg(cfg, where) -> dict:
    """A preprocess_cfg whose keys are open_clip's PreprocessCfg fields (image_transform_v2 takes nothing else)."""
    from dataclasses import fields

    from open_clip.transform import PreprocessCfg

    cfg = _mapping(cfg, where, "preprocess_cfg")
    known = {f.name for f in fields(PreprocessCfg)}
    unknown = sorted(str(k) for k in cfg if k not in known)
    if unknown:
        raise HippError(f"{where}: preprocess_cfg key {_show(unknown[0])} is not one of {sorted(known)}")
    return cfg


# --- transformers: config.json (or an hf export's model_cfg) and the files beside it ---

MODEL_TYPES = ("clip", "siglip", "llava")
# the towers of a LLaVA that the llava backend gates: a CLIP vision tower and a Llama-shaped decoder
LLAVA_PARTS = {"vision_config": ("clip_vision_model",), "text_config": ("llama", "qwen2")}
# transformers' generic fast tokenizer (TokenizersBackend in 5.x) reads tokenizer.json and runs no
# code: the embedded LLaVA teacher's word-level tokenizer is one
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast", "SiglipTokenizer", "SiglipTokenizerFast",
                     "TokenizersBackend", "PreTrainedTokenizerFast")
IMAGE_PROCESSORS = tuple(f"{family}{kind}" for family in ("CLIP", "Siglip")
                         for kind in ("ImageProcessor", "ImageProcessorFast", "ImageProcessorPil", "FeatureExtractor"))
ATTENTION = ("eager", "sdpa")  # anything else may be a kernel that transformers fetches from the hub
_ATTENTION_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal",
                   "experts_implementation", "_experts_implementation")
# metadata that older save_pretrained calls recorded, often as the saver's own absolute path: transformers
# finds these files by their fixed names inside the folder and never opens the recorded value
_RECORDED_ONLY = ("special_tokens_map_file", "name_or_path", "_name_or_path")
_FILE_SUFFIXES = ("_file", "_files", "_path", "_dir", "_directory")

HF_CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
IMAGE_PROCESSOR_CONFIGS = ("preprocessor_config.json", "processor_config.json")
ADAPTER_CONFIG = "adapter_config.json"


def transformers_config(config, where, spec=None) -> dict:
    """A transformers CLIP / SigLIP / LLaVA config whose loading keys all stay local."""
    config = _mapping(config, where, "the transformers config")
    no_remote_code(config, where)
    kind = config.get("model_type")
    if kind not in MODEL_TYPES:
        raise HippError(f"{spec or where} is a transformers {kind!r} model; HiPP prunes clip and siglip "
                        "(and llava with a CLIP vision tower and a Llama / Qwen2 decoder)")
    if kind == "llava":
        _llava_parts(config, where)
    for name, key, value in _walk(config):
        if key in _ATTENTION_KEYS:
            _attention(value, where, name)
        elif key == "tokenizer_class" and value is not None:
            _tokenizer_class(value, where, name)
        elif key == "quantization_config" and value:
            raise HippError(f"{where} holds quantized weights ({name}); HiPP prunes float CLIP / SigLIP models")
        elif key == "transformers_weights" and value is not None:
            _weights_name(value, where, name)
    return config


def _llava_parts(config: dict, where) -> None:
    """Both sub-configs named explicitly: transformers would fill a missing one with a default model (a
    Llama-7B-sized decoder), and an unknown model_type would build a tower the llava backend cannot gate."""
    for part, kinds in LLAVA_PARTS.items():
        sub = config.get(part)
        if not isinstance(sub, dict):
            raise HippError(f"{where}: a llava config needs {part} (a mapping), not {_show(sub)}")
        if sub.get("model_type") not in kinds:
            raise HippError(f"{where}: {part}.model_type {_show(sub.get('model_type'))} is not one HiPP prunes "
                            f"in a llava model ({', '.join(kinds)})")


def _attention(value, where, name: str) -> None:
    for impl in (value.values() if isinstance(value, dict) else [value]):
        if impl is None or impl in ATTENTION:
            continue
        if isinstance(impl, str) and "/" in impl:  # org/repo: a hub kernel
            raise elsewhere(where, name, impl)
        raise HippError(f"{where}: attention implementation {_show(impl)} ({name}) is not one HiPP runs "
                        f"({', '.join(ATTENTION)})")


def loaded_attention(config, where) -> None:
    """The attention implementations a loaded config (and its towers) carry: transformers fetches a kernel
    named by its hub repository while building the model, whatever trust_remote_code says."""
    for part in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        if part is not None:
            _attention(getattr(part, "_attn_implementation", None), where, "attn_implementation")


def _tokenizer_class(value, where, name: str) -> None:
    if value not in TOKENIZER_CLASSES:
        raise HippError(f"{where} names tokenizer class {_show(value)} ({name}); HiPP reads CLIP, SigLIP and plain "
                        f"tokenizer.json tokenizers only ({', '.join(TOKENIZER_CLASSES)})")


def _plain_name(value) -> bool:
    """A file name inside the folder itself: no directory part, nothing to resolve elsewhere."""
    return (isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\\" not in value
            and ":" not in value)


def _weights_name(value, where, name: str) -> None:
    if not _plain_name(value):
        raise elsewhere(where, name, value)
    if not value.endswith((".safetensors", ".safetensors.index.json")):
        raise HippError(f"{where} names weights file {_show(value)} ({name}); HiPP reads safetensors weights only")


def tokenizer_config(config, where) -> dict:
    """tokenizer_config.json: a CLIP / SigLIP tokenizer class, and no file named by path (transformers 4.x
    opens such a path as given, relative to the working directory)."""
    config = _mapping(config, where, "tokenizer config")
    no_remote_code(config, where)
    if config.get("tokenizer_class") is not None:
        _tokenizer_class(config["tokenizer_class"], where, "tokenizer_class")
    for name, key, value in _walk(config):
        if key in _RECORDED_ONLY or value in (None, "", [], {}):
            continue
        if isinstance(key, str) and (key.endswith(_FILE_SUFFIXES)
                                     or (key in ("vocab", "merges") and isinstance(value, str))):
            raise elsewhere(where, name, value)
    return config


def image_processor_config(config, where) -> dict:
    config = _mapping(config, where, "image processor config")
    no_remote_code(config, where)
    for name, key, value in _walk(config):
        if key in ("image_processor_type", "feature_extractor_type") and value is not None \
                and value not in IMAGE_PROCESSORS:
            raise HippError(f"{where} names image processor {_show(value)} ({name}); HiPP reads CLIP and SigLIP "
                            f"image processors only ({', '.join(IMAGE_PROCESSORS)})")
    return config


def _weight_index(path: Path) -> None:
    """A sharded checkpoint's index: every shard a file of this folder."""
    weight_map = _mapping(read_json(path).get("weight_map"), path, "weight_map")
    for tensor, shard in weight_map.items():
        if not _plain_name(shard):
            raise elsewhere(path, f"weight_map.{repr(str(tensor))[1:-1]}", shard)


def transformers_folder(path, need_config: bool = True) -> dict | None:
    """Every file transformers reads from a CLIP / SigLIP folder (model, tokenizer, image processor),
    checked; returns config.json's content (None when the folder has none and need not)."""
    path = Path(path)
    config = None
    if need_config or (path / HF_CONFIG).is_file():
        config = transformers_config(read_json(path / HF_CONFIG), path / HF_CONFIG, spec=path)
    if (path / TOKENIZER_CONFIG).is_file():
        tokenizer_config(read_json(path / TOKENIZER_CONFIG), path / TOKENIZER_CONFIG)
    for name in IMAGE_PROCESSOR_CONFIGS:
        if (path / name).is_file():
            image_processor_config(read_json(path / name), path / name)
    if (path / ADAPTER_CONFIG).exists():
        # a PEFT adapter: transformers would load it over its base model, which older releases fetch by name
        raise HippError(f"{path / ADAPTER_CONFIG} makes transformers load a PEFT adapter and the base model it "
                        "names; HiPP loads complete CLIP / SigLIP folders only")
    for index in sorted(path.glob("*.safetensors.index.json")):
        _weight_index(index)
    return config
