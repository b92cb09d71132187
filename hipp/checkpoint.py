"""One loading path for every model the project touches.

A folder in open_clip's own local-dir layout (`open_clip_config.json` + safetensors weights) is
the embedded teacher's format, so `open_clip.create_model("local-dir:...")` reads it too. Any
other string is an open_clip model name, loaded by open_clip with `pretrained` as given (a tag
such as "openai" or a local weights file).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from .errors import HippError
from .fileio import load_tensors, read_json, save_tensors, write_json

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
# an exported pruned model (hipp export): its own weights file and config beside open_clip's config
PRUNED_CONFIG_NAME = "pruned_config.json"
PRUNED_WEIGHTS_NAME = "model.safetensors"
PRUNED_FORMAT = "hipp-pruned"
PRUNED_VERSION = 1


def _build(model_cfg: dict) -> torch.nn.Module:
    cfg = dict(model_cfg)
    custom_text = cfg.pop("custom_text", False)
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        return cls(**cfg)
    except (TypeError, ValueError, KeyError, AssertionError) as e:
        raise HippError(f"model_cfg cannot build an open_clip model ({e})") from None


def load_model(spec: str | Path, pretrained: str | None = None, device: str = "cpu") -> torch.nn.Module:
    """A frozen, eval-mode model with encode_image / encode_text, from a folder or a model name."""
    path = Path(spec)
    if path.is_dir():
        model = _load_dir(path)
    elif path.exists():
        raise HippError(f"{path} is a file; expected a model folder or an open_clip model name")
    elif str(spec) in open_clip.list_models():
        try:
            model = open_clip.create_model(str(spec), pretrained=pretrained)
        except Exception as e:  # hub unreachable, unknown tag, bad file: all user-facing here
            raise HippError(f"cannot load open_clip {spec!r} with pretrained={pretrained!r}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    else:
        raise HippError(f"{spec} is neither a model folder nor a known open_clip model name")
    model.to(device).eval().requires_grad_(False)
    return model


def _load_dir(path: Path) -> torch.nn.Module:
    if (path / PRUNED_CONFIG_NAME).is_file():
        return _load_pruned(path)
    if not (path / CONFIG_NAME).is_file():
        raise HippError(f"{path} has no {CONFIG_NAME}; not a model folder this project wrote")
    config = read_json(path / CONFIG_NAME)
    if "model_cfg" not in config:
        raise HippError(f"{path / CONFIG_NAME} has no 'model_cfg'")
    model = _build(config["model_cfg"])
    _load_state(model, path / WEIGHTS_NAME, "config")
    open_clip.set_model_preprocess_cfg(model, {**PreprocessCfg().__dict__, **config.get("preprocess_cfg", {})})
    return model


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


def _load_pruned(path: Path) -> torch.nn.Module:
    """An exported model: open_clip's model from model_cfg, resized to the recorded structure with the
    project's module classes (no controller, no base weights), then a strict load."""
    from .materialize import empty_model

    where = path / PRUNED_CONFIG_NAME
    config = read_json(where)
    if config.get("format") != PRUNED_FORMAT:
        raise HippError(f"{where} is not a HiPP pruned-model config (format {config.get('format')!r})")
    if config.get("version") != PRUNED_VERSION:
        raise HippError(f"{where} has version {config.get('version')!r}; this HiPP reads {PRUNED_VERSION}")
    for key, kind in (("model_cfg", dict), ("structure", dict), ("num_params", int)):
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
            raise HippError(f"{where} needs {key!r} ({kind.__name__})")
    model = empty_model(config["model_cfg"], config["structure"])
    _load_state(model, path / PRUNED_WEIGHTS_NAME, PRUNED_CONFIG_NAME)
    n = sum(p.numel() for p in model.parameters())
    if n != config["num_params"]:
        raise HippError(f"{path} holds {n:,} parameters; {PRUNED_CONFIG_NAME} says {config['num_params']:,}")
    open_clip.set_model_preprocess_cfg(model, {**PreprocessCfg().__dict__, **config.get("preprocess_cfg", {})})
    return model


def save_model(model: torch.nn.Module, path: str | Path, model_cfg: dict, preprocess_cfg: dict,
               dtype: torch.dtype = torch.float16) -> None:
    """Write a folder `load_model` and open_clip's local-dir loader both read."""
    path = Path(path)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_tensors(path / WEIGHTS_NAME, state)
    write_json(path / CONFIG_NAME, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})


def preprocess_cfg(model: torch.nn.Module) -> dict:
    return dict(open_clip.get_model_preprocess_cfg(model))


def get_tokenizer(spec: str | Path):
    path = Path(spec)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise HippError(f"{path} has no {CONFIG_NAME}; not a model folder this project wrote")
        return open_clip.get_tokenizer(f"local-dir:{path}")
    return open_clip.get_tokenizer(str(spec))


def get_preprocess(spec: str | Path):
    """The eval-time PIL -> tensor transform the model expects."""
    path = Path(spec)
    if path.is_dir():
        cfg = read_json(path / CONFIG_NAME).get("preprocess_cfg", {})
        return image_transform_v2(PreprocessCfg(**{**PreprocessCfg().__dict__, **cfg}), is_train=False)
    _, _, preprocess = open_clip.create_model_and_transforms(str(spec))
    return preprocess


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the weights' names, shapes and values: which base model a file belongs to."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]
