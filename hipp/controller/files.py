"""Reading a saved controller back: every field of controller.json and every tensor of its weights
is checked before anything is built from them, so a hand-edited or foreign folder is one line."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..core.space import PruneSpace
from ..errors import HippError
from ..storage.fileio import load_tensors, read_json
from .network import CONFIG_NAME, FORMAT, VERSION, WEIGHTS_NAME, Controller

# What a controller.json may hold, checked before anything is built from it: a hand-edited or
# foreign file must be one line, not a TypeError deep in torch or a multi-gigabyte allocation.
HPARAM_INTS = ("hidden", "rank", "depth")
HPARAM_BOOLS = ("factorised", "flops_target", "visual_sensitivity", "quality_biases")
MAX_WIDTH = 1 << 16             # hidden / rank / depth of any controller worth loading
MAX_LAYER_FIELD = 1 << 31       # width, heads, tokens... of one layer of the base model
EXTRA_TYPES = {"base_model": (str,), "pretrained": (str, type(None)), "family": (str, type(None)),
               "train_config": (dict, type(None)), "latency_profile": (dict, type(None))}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _present(path: Path) -> bool:
    """Whether `path` exists; unlike os.path.exists, a permission error is one line, not False."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise HippError(f"{path} cannot be read ({e.strerror or e})") from None
    return True


def _read_config(directory: Path) -> dict:
    from ..data.user import check_regular

    try:
        is_dir = directory.is_dir()
    except OSError as e:
        raise HippError(f"controller folder {directory} cannot be read ({e.strerror or e})") from None
    if not is_dir:
        if directory.exists():
            raise HippError(f"controller folder {directory} is a file, not a folder")
        raise HippError(f"controller folder not found: {directory}")
    if not _present(directory / CONFIG_NAME):
        raise HippError(f"{directory} has no {CONFIG_NAME}; not a controller folder")
    check_regular(directory / CONFIG_NAME, "controller config")  # read_json would block on a FIFO
    return read_json(directory / CONFIG_NAME)


def _check_header(cfg: dict, where: Path) -> str:
    """Format, version and fingerprint; returns the fingerprint."""
    if cfg.get("format") != FORMAT:
        raise HippError(f"{where} is not a HiPP controller config (format {cfg.get('format')!r})")
    version = cfg.get("version")
    if _is_int(version) and version > VERSION:
        raise HippError(f"{where} was written by a newer HiPP (controller version {version}); "
                        f"this HiPP reads up to {VERSION}")
    if version != VERSION or not _is_int(version):
        raise HippError(f"{where} has controller version {version!r}; this HiPP reads {VERSION}")
    saved = cfg.get("fingerprint")
    if not isinstance(saved, str) or not saved.strip():
        raise HippError(f"{where} has no base-model 'fingerprint' (got {saved!r}); a controller must say which "
                        "base model it was trained for")
    for key in ("objective_names", "hparams", "space"):
        if key not in cfg:
            raise HippError(f"{where} lacks {key!r}")
    names = cfg["objective_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise HippError(f"{where}: 'objective_names' must be a non-empty list of strings")
    return saved


def _check_hparams(hparams, where: Path) -> dict:
    if not isinstance(hparams, dict):
        raise HippError(f"{where}: 'hparams' must be an object")
    known = {*HPARAM_INTS, *HPARAM_BOOLS, "init_bias"}
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise HippError(f"{where}: unknown hparams key {unknown[0]!r}; expected some of {', '.join(sorted(known))}")
    for key in HPARAM_INTS:
        v = hparams.get(key, 1)
        if not (_is_int(v) and 1 <= v <= MAX_WIDTH):
            raise HippError(f"{where}: hparams.{key} must be a whole number in [1, {MAX_WIDTH}], got {v!r}")
    for key in HPARAM_BOOLS:
        if not isinstance(hparams.get(key, False), bool):
            raise HippError(f"{where}: hparams.{key} must be true or false, got {hparams[key]!r}")
    bias = hparams.get("init_bias", 0.0)
    if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
        raise HippError(f"{where}: hparams.init_bias must be a finite number, got {bias!r}")
    return hparams


def _check_space(d, where: Path) -> PruneSpace:
    if not isinstance(d, dict) or not isinstance(d.get("layers"), list) or not d["layers"]:
        raise HippError(f"{where}: 'space' must be an object with a non-empty 'layers' list")
    for i, layer in enumerate(d["layers"]):
        if not isinstance(layer, dict) or not isinstance(layer.get("tower"), str):
            raise HippError(f"{where}: space.layers[{i}] must be an object with a 'tower' name")
        for key, v in layer.items():
            if key != "tower" and not (_is_int(v) and 0 <= v <= MAX_LAYER_FIELD):
                raise HippError(f"{where}: space.layers[{i}].{key} must be a whole number in [0, 2**31], got {v!r}")
        for key in ("channel_group", "group_size"):
            if layer.get(key, 1) < 1:
                raise HippError(f"{where}: space.layers[{i}].{key} must be >= 1")
    for key in ("fixed_flops", "fixed_params"):
        costs = d.get(key)
        if not isinstance(costs, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in costs.values()):
            raise HippError(f"{where}: space.{key} must map towers to finite numbers")
    _check_tokens(d.get("tokens", []), where)
    try:
        return PruneSpace.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise HippError(f"{where} has a malformed 'space' ({e})") from None


def _check_tokens(levels, where: Path) -> None:
    """A space's token levels: whole counts and layers, a known rule, finite costs, names as strings."""
    from ..backends.token_rank import RULES

    if not isinstance(levels, list) or not all(isinstance(t, dict) for t in levels):
        raise HippError(f"{where}: space.tokens must be a list of objects")
    for i, t in enumerate(levels):
        def whole(v, least: int) -> bool:
            return _is_int(v) and least <= v <= MAX_LAYER_FIELD

        def finite(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        checks = {"tokens": whole(t.get("tokens"), 1), "after": whole(t.get("after", -1), -1),
                  "rank_layer": whole(t.get("rank_layer", -1), -1), "rule": t.get("rule", "cls") in RULES,
                  **{k: finite(t.get(k, 0.0)) for k in ("per_token_flops", "rank_flops")},
                  **{k: isinstance(t.get(k, ""), str) for k in ("stage", "fixed_stage", "rank_stage")}}
        for field, ok in checks.items():
            if not ok:
                raise HippError(f"{where}: space.tokens[{i}].{field} is malformed (got {t.get(field)!r})")


def _check_extra(extra, where: Path) -> dict:
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise HippError(f"{where}: 'extra' must be an object, got {type(extra).__name__}")
    for key, types in EXTRA_TYPES.items():
        if key in extra and not isinstance(extra[key], types):
            raise HippError(f"{where}: extra.{key} has the wrong type ({type(extra[key]).__name__})")
    return dict(extra)


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    from ..data.user import check_regular

    if not _present(path):
        raise HippError(f"missing weights file: {path}")
    check_regular(path, "controller weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise HippError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None


def _check_weights(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], path: Path) -> None:
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise HippError(f"{path} does not match {CONFIG_NAME}: {len(missing)} missing, "
                        f"{len(unexpected)} unexpected tensors (first: {(missing + unexpected)[0]})")
    for name, shape in found.items():
        if shape != expected[name]:
            raise HippError(f"{path}: {name} has shape {shape}, config says {expected[name]}")


def load_controller(directory, fingerprint: str | None = None, map_location: str = "cpu") -> Controller:
    """Rebuild a saved controller; with `fingerprint`, refuse one trained for another base model."""
    directory = Path(directory)
    cfg = _read_config(directory)
    where = directory / CONFIG_NAME
    saved = _check_header(cfg, where)
    hparams = _check_hparams(cfg["hparams"], where)
    space = _check_space(cfg["space"], where)
    extra = _check_extra(cfg.get("extra"), where)
    names = cfg["objective_names"]
    if fingerprint is not None and saved != fingerprint:
        raise HippError(f"controller in {directory} was trained for base model {saved!r}, not {fingerprint!r}")
    with torch.device("meta"):  # the shapes the config implies, without allocating them
        probe = Controller(space, names, **hparams)
    expected = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    _check_weights(expected, _file_shapes(directory / WEIGHTS_NAME), directory / WEIGHTS_NAME)
    state = load_tensors(directory / WEIGHTS_NAME)
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise HippError(f"{directory / WEIGHTS_NAME}: {name} holds {tensor.dtype} values, not floats")
        if not bool(torch.isfinite(tensor).all()):
            raise HippError(f"{directory / WEIGHTS_NAME}: {name} holds non-finite values")
    controller = Controller(space, names, **hparams)
    controller.load_state_dict(state, strict=True)
    controller.fingerprint = saved
    controller.extra = extra
    return controller.to(map_location).eval()
