"""One loading path for every model the project touches.

A folder in open_clip's own local-dir layout (`open_clip_config.json` + safetensors weights) is
the embedded teacher's format, so `open_clip.create_model("local-dir:...")` reads it too. A folder
with a transformers `config.json` (model_type clip or siglip) loads through transformers, and one of
model_type llava (a CLIP vision tower and a Llama / Qwen2 decoder) as transformers'
LlavaForConditionalGeneration (backends/llava.py). A folder with `pruned_config.json` is a HiPP
export of any of them. Any other string is an open_clip
model name, loaded by open_clip with `pretrained` as given (a tag such as "openai" or a local
weights file), or a transformers hub id ("openai/clip-vit-base-patch32").

A folder is data, never code: its configs are checked (hipp/untrusted.py) before open_clip or
transformers is handed anything from it, and refused in one line when they ask for remote code, a
download or a file elsewhere.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from . import untrusted
from ..backends import get_backend
from ..errors import HippError
from .fileio import load_tensors, read_json, save_tensors, write_json

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
# an exported pruned model (hipp export): its own weights file and config beside open_clip's config
PRUNED_CONFIG_NAME = "pruned_config.json"
PRUNED_WEIGHTS_NAME = "model.safetensors"
PRUNED_FORMAT = "hipp-pruned"
PRUNED_VERSION = 1


FAMILIES = ("open_clip", "clip", "siglip", "llava")  # open_clip's CLIP, transformers' CLIPModel / SiglipModel / LLaVA
PRUNED_BACKENDS = ("open_clip", "hf", "llava")


def family(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)  # LlavaForConditionalGeneration: the transformers model itself
    if getattr(config, "model_type", None) == "llava":
        return "llava"
    return getattr(model, "model_type", "open_clip")


def contrastive_only(model: torch.nn.Module, command: str) -> None:
    """Commands whose loss is still contrastive only (recovery: encode_image / encode_text) refuse a
    generative LLaVA in one line, not a traceback; controller training serves both families."""
    if family(model) == "llava":
        raise HippError(f"hipp {command} does not run llava models yet (load, materialise and export do); "
                        "it takes open_clip, clip and siglip models")


def look_up(spec: str, folder=None) -> str:
    """A relative base folder as given when it exists, else found from `folder` (a controller's, an
    export's) and its parents; an open_clip name or hub id comes back unchanged."""
    path = Path(spec)
    if path.exists() or path.is_absolute() or folder is None:
        return spec
    here = Path(folder).resolve()
    for root in (here, *here.parents):
        if (root / path).exists():
            return str(root / path)
    return spec


def is_hub_id(spec) -> bool:
    """org/name: a transformers hub id. A missing path looks different (/, ./, more parts, or a
    first part that is a local folder: checkpoints/teacher-tiy is a typo, not a hub id)."""
    path = Path(str(spec))
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(spec)) is not None
            and not path.exists() and not path.parent.is_dir())


def is_open_clip_name(spec) -> bool:
    """One of open_clip's built-in model names. open_clip (with torchvision and transformers behind it,
    seconds to import) is imported only for a name that could be one: they hold no "/"."""
    if "/" in str(spec) or "\\" in str(spec):
        return False
    import open_clip
    return str(spec) in open_clip.list_models()


def load_model(spec: str | Path, pretrained: str | None = None, device: str = "cpu",
               expect: str | None = None, seed: int | None = None) -> torch.nn.Module:
    """A frozen, eval-mode model with encode_image / encode_text, from a folder or a model name.

    Folders: the project's open_clip layout, a transformers CLIP / SigLIP folder, or a HiPP export.
    Names: an open_clip model name (with `pretrained`), or a transformers hub id such as
    "openai/clip-vit-base-patch32" (the local cache first). `expect` (open_clip / clip / siglip)
    refuses a model of another family. `seed` fixes the initial weights of a model built without
    pretrained weights (an architecture name with `pretrained: null`), so a later run rebuilds the
    same base, with the same fingerprint; the caller's random stream is left as it was.
    """
    from ..backends import hf

    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return load_model(spec, pretrained, device, expect)
    if expect is not None and expect not in FAMILIES:
        raise HippError(f"unknown model family {expect!r}; expected one of {FAMILIES}")
    path = Path(spec)
    if path.is_dir():
        model = _load_dir(path, expect)
    elif path.exists():
        raise HippError(f"{path} is a file; expected a model folder or a model name")
    elif is_open_clip_name(spec):
        import open_clip
        try:
            model = open_clip.create_model(str(spec), pretrained=pretrained)
        except Exception as e:  # hub unreachable, unknown tag, bad file: all user-facing here
            raise HippError(f"cannot load open_clip {spec!r} with pretrained={pretrained!r}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    elif is_hub_id(spec):
        if pretrained is not None:
            raise HippError(f"pretrained={pretrained!r} applies to open_clip names; {spec} is a transformers hub id")
        model = hf.load(str(spec), expect)
    else:
        raise _not_a_model(spec)
    if expect is not None and family(model) != expect:
        raise HippError(f"{spec} is a {family(model)} model, but {expect} was asked for")
    model.to(device).eval().requires_grad_(False)
    return model


def _not_a_model(spec) -> HippError:
    return HippError(f"{spec} is neither a model folder (none there), an open_clip model name nor a "
                     "transformers hub id (org/name)")


def _load_dir(path: Path, expect: str | None = None) -> torch.nn.Module:
    from ..backends import hf

    configs = checked_folder(path)
    if PRUNED_CONFIG_NAME in configs:
        return _load_pruned(path, configs[PRUNED_CONFIG_NAME])
    if CONFIG_NAME not in configs and (path / hf.HF_CONFIG).is_file():
        if hf.folder_model_type(path) == "llava":
            from ..backends import llava
            return llava.load(path)
        return hf.load(str(path), expect)
    if CONFIG_NAME not in configs:
        raise HippError(f"{path} is not a model folder: no {CONFIG_NAME} (open_clip), {hf.HF_CONFIG} "
                        f"(transformers CLIP / SigLIP) or {PRUNED_CONFIG_NAME} (HiPP export)")
    config = configs[CONFIG_NAME]
    model = get_backend("open_clip").build(config["model_cfg"])
    _load_state(model, path / WEIGHTS_NAME, "config")
    set_preprocess_cfg(model, config.get("preprocess_cfg") or {})
    return model


def checked_folder(path: Path) -> dict:
    """The folder's configs by file name, each checked (hipp/untrusted.py) before anything is built or
    tokenized from it: no file in it may make open_clip or transformers run code, download or read
    outside it. A folder is accepted or refused as a whole, by every entry point alike."""
    from ..backends import hf

    configs = {}
    if (path / PRUNED_CONFIG_NAME).is_file():
        configs[PRUNED_CONFIG_NAME] = _checked_pruned(path / PRUNED_CONFIG_NAME)
    if (path / CONFIG_NAME).is_file():  # an export's copy too: its tokenizer and base_config read it
        configs[CONFIG_NAME] = _checked_open_clip(path / CONFIG_NAME)
    if configs.get(PRUNED_CONFIG_NAME, {}).get("backend") in ("hf", "llava"):  # its tokenizer files
        untrusted.transformers_folder(path, need_config=False)
    elif not configs and (path / hf.HF_CONFIG).is_file():
        untrusted.transformers_folder(path)
    return configs


def _checked_open_clip(where: Path) -> dict:
    config = read_json(where)
    if "model_cfg" not in config:
        raise HippError(f"{where} has no 'model_cfg'")
    untrusted.open_clip_cfg(config["model_cfg"], where)
    untrusted.preprocess_cfg(config.get("preprocess_cfg"), where)
    return config


def _checked_pruned(where: Path) -> dict:
    config = read_json(where)
    if config.get("format") != PRUNED_FORMAT:
        raise HippError(f"{where} is not a HiPP pruned-model config (format {config.get('format')!r})")
    if config.get("version") != PRUNED_VERSION:
        raise HippError(f"{where} has version {config.get('version')!r}; this HiPP reads {PRUNED_VERSION}")
    for key, kind in (("model_cfg", dict), ("structure", dict), ("num_params", int)):
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
            raise HippError(f"{where} needs {key!r} ({kind.__name__})")
    backend = config.get("backend", "open_clip")
    if backend == "open_clip":
        untrusted.open_clip_cfg(config["model_cfg"], where)
    elif backend in ("hf", "llava"):
        untrusted.transformers_config(config["model_cfg"], where)
        kind = config["model_cfg"].get("model_type")
        if (backend == "llava") != (kind == "llava"):  # build() would refuse it later, less clearly
            raise HippError(f"{where}: backend {backend!r} does not build a transformers {kind!r} model")
    else:
        raise HippError(f"{where}: unknown backend {backend!r}; expected one of {', '.join(PRUNED_BACKENDS)}")
    untrusted.preprocess_cfg(config.get("preprocess_cfg"), where)
    return config


def _load_state(model: torch.nn.Module, weights: Path, config_name: str) -> None:
    """Strict load with every mismatch named in one line (never torch's multi-line report)."""
    state = load_tensors(weights)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise HippError(f"{weights} does not match its {config_name}: "
                        f"{len(missing)} missing, {len(unexpected)} unexpected tensors "
                        f"(first: {(missing + unexpected)[0]})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise HippError(f"{weights}: {name} has shape {tuple(tensor.shape)}, "
                            f"{config_name} says {tuple(expected[name].shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def _load_pruned(path: Path, config: dict) -> torch.nn.Module:
    """An exported model (its checked pruned_config.json): the backend's model from model_cfg, resized
    to the recorded structure with the project's module classes (no controller, no base weights), then
    a strict load."""
    from ..export.slicing import empty_model

    model = empty_model(config["model_cfg"], config["structure"], config.get("backend", "open_clip"))
    _load_state(model, path / PRUNED_WEIGHTS_NAME, PRUNED_CONFIG_NAME)
    n = sum(p.numel() for p in model.parameters())
    if n != config["num_params"]:
        raise HippError(f"{path} holds {n:,} parameters; {PRUNED_CONFIG_NAME} says {config['num_params']:,}")
    set_preprocess_cfg(model, config.get("preprocess_cfg") or {})
    budget = config.get("visual_tokens")
    if budget is not None:  # the export prunes its visual tokens itself, as the plan said
        from ..backends import visual_tokens
        spec = visual_tokens.VisualTokens.from_dict(budget, f"{path}: visual_tokens")
        if (spec.stage == "language") != (family(model) == "llava"):
            raise HippError(f"{path}: {PRUNED_CONFIG_NAME} sets {spec.stage} tokens for a {family(model)} model")
        visual_tokens.install(model, spec)
    return model


def set_preprocess_cfg(model: torch.nn.Module, cfg: dict) -> None:
    if family(model) == "open_clip":
        import open_clip
        from open_clip.transform import PreprocessCfg
        open_clip.set_model_preprocess_cfg(model, {**PreprocessCfg().__dict__, **cfg})
    else:
        model.preprocess_cfg = dict(cfg)


def save_model(model: torch.nn.Module, path: str | Path, model_cfg: dict, preprocess_cfg: dict,
               dtype: torch.dtype = torch.float16) -> None:
    """Write a folder `load_model` and open_clip's local-dir loader both read."""
    path = Path(path)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_tensors(path / WEIGHTS_NAME, state)
    write_json(path / CONFIG_NAME, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})


def preprocess_cfg(model: torch.nn.Module) -> dict:
    if family(model) != "open_clip":
        return dict(model.preprocess_cfg)
    import open_clip
    return dict(open_clip.get_model_preprocess_cfg(model))


def get_tokenizer(spec: str | Path):
    """texts -> [N, context_length] token ids, as the model at `spec` expects them."""
    from ..backends import hf

    path = Path(spec)
    if path.is_dir():
        configs = checked_folder(path)
        pruned = configs.get(PRUNED_CONFIG_NAME)
        if pruned is not None and pruned.get("backend") == "hf":
            return hf.tokenizer(path, _text_context(pruned, path / PRUNED_CONFIG_NAME))
        if pruned is None and CONFIG_NAME not in configs and (path / hf.HF_CONFIG).is_file():
            return hf.tokenizer(path)
        if CONFIG_NAME not in configs:
            raise HippError(f"{path} has no {CONFIG_NAME} or {hf.HF_CONFIG}; not a model folder")
        return _open_clip_tokenizer(configs[CONFIG_NAME]["model_cfg"])
    if is_open_clip_name(spec):
        import open_clip
        return open_clip.get_tokenizer(str(spec))
    if is_hub_id(spec):
        return hf.tokenizer(spec)
    # anything else would reach open_clip's own schemes (hf-hub:, local-dir:) past the folder checks
    raise _not_a_model(spec)


PROCESSOR_FILES = ("processor_config.json", "tokenizer_config.json", "tokenizer.json")


def get_processor(spec: str | Path):
    """The LlavaProcessor (image processor and tokenizer) a LLaVA folder holds beside the model, read with
    transformers' AutoProcessor after the folder's files are checked; never code from the folder."""
    import transformers

    from ..backends.hf import _first_line, load_options

    path = Path(spec)
    if not path.is_dir():
        raise HippError(f"{spec} is not a folder; a llava processor is read from the model's folder")
    checked_folder(path)
    missing = [name for name in PROCESSOR_FILES if not (path / name).is_file()]
    if missing:
        raise HippError(f"{path} has no processor ({missing[0]} is missing): save the model's LlavaProcessor "
                        "there with processor.save_pretrained(folder)")
    try:
        processor = transformers.AutoProcessor.from_pretrained(str(path), **load_options(path))
    except Exception as e:  # bad JSON, an unknown class: one line
        raise HippError(f"cannot load the processor of {path}: {_first_line(e)}") from None
    if not isinstance(processor, transformers.LlavaProcessor):
        raise HippError(f"{path} holds a {type(processor).__name__}, not a LlavaProcessor")
    return processor


def _open_clip_tokenizer(model_cfg: dict):
    """open_clip's tokenizer for a checked model_cfg, made here: open_clip.get_tokenizer("local-dir:...")
    would read the config again, after it was checked."""
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, SimpleTokenizer

    text = model_cfg.get("text_cfg") or {}
    return SimpleTokenizer(context_length=text.get("context_length", DEFAULT_CONTEXT_LENGTH),
                           **(text.get("tokenizer_kwargs") or {}))


def _text_context(pruned: dict, where: Path) -> int:
    text = pruned["model_cfg"].get("text_config")
    context = text.get("max_position_embeddings") if isinstance(text, dict) else None
    if not isinstance(context, int) or isinstance(context, bool) or context < 1:
        raise HippError(f"{where} needs model_cfg.text_config.max_position_embeddings (a positive int)")
    return context


def get_preprocess(spec: str | Path):
    """The eval-time PIL -> tensor transform the model expects."""
    path = Path(spec)
    if path.is_dir():
        configs = checked_folder(path)
        own = configs.get(PRUNED_CONFIG_NAME) or configs.get(CONFIG_NAME)
        cfg = (own.get("preprocess_cfg") or {}) if own is not None else preprocess_cfg(load_model(spec))
    elif is_open_clip_name(spec):
        import open_clip
        _, _, preprocess = open_clip.create_model_and_transforms(str(spec))
        return preprocess
    elif is_hub_id(spec):
        cfg = preprocess_cfg(load_model(spec))
    else:
        raise _not_a_model(spec)
    from open_clip.transform import PreprocessCfg, image_transform_v2
    return image_transform_v2(PreprocessCfg(**{**PreprocessCfg().__dict__, **cfg}), is_train=False)


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the weights' names, shapes and values: which base model a file belongs to."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]
