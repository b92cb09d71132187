"""Resumable training state in one safetensors file: the controller's weights, the optimizer's
tensors and, as JSON metadata, the step, the elapsed seconds and what the run was (config, base
fingerprint, process count). Nothing is unpickled; one atomic rename moves from one state to the
next, so a kill at any moment leaves the previous state or the new one.

Every random draw of training is a function of (seed, step, process), so these tensors and the step
are all a resumed run needs to continue exactly as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import HippError
from ..storage import outputs
from ..storage.fileio import load_tensors, save_tensors, write_text

STATE_NAME = "train_state.safetensors"
LEGACY_STATE_DIR = "train_state"  # Accelerate's pickled save_state of earlier releases: never loaded
FORMAT, VERSION = "hipp-train-state", 1
# config keys a resumed run may change: they alter no number the run computes
FREE_KEYS = ("output", "save_every", "tensorboard", "eval_every")


def save(path, controller: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    opt = optimizer.state_dict()
    tensors = {f"controller.{k}": v for k, v in controller.state_dict().items()}
    scalars = {}
    for index, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    info = {"format": FORMAT, "version": VERSION, **meta, "param_groups": opt["param_groups"],
            "optimizer_scalars": scalars}
    save_tensors(path, tensors, metadata={"hipp": json.dumps(info)})


def load(path) -> tuple[dict, dict, dict]:
    """(controller state dict, optimizer state dict, metadata) of a saved state; refuses anything else."""
    path = Path(path)
    tensors, metadata = load_tensors(path, with_metadata=True)
    try:
        info = json.loads(metadata["hipp"])
    except (KeyError, ValueError):
        raise HippError(f"{path} holds no HiPP training state") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise HippError(f"{path} holds no HiPP training state")
    if not isinstance(info.get("version"), int) or info["version"] > VERSION:
        raise HippError(f"{path} was written by a newer HiPP (state version {info.get('version')!r}); "
                        f"this HiPP reads up to {VERSION}")
    try:
        controller = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("controller.")}
        state: dict = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for key, value in info.get("optimizer_scalars", {}).items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        info["step"], info["seconds"] = int(info["step"]), float(info["seconds"])
        if not isinstance(info["param_groups"], list) or not isinstance(info.get("run", {}), dict):
            raise TypeError("malformed")
    except (KeyError, ValueError, TypeError, AttributeError):
        raise HippError(f"{path} holds no valid HiPP training state") from None
    return controller, {"state": state, "param_groups": info["param_groups"]}, info


def differences(saved: dict, now: dict) -> list[str]:
    """'key: saved -> now' for every run setting that differs (FREE_KEYS aside), nested keys dotted."""
    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v
    a, b = dict(flat(saved)), dict(flat(now))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if k not in FREE_KEYS and a.get(k) != b.get(k)]


def check_same_run(path, info: dict, now: dict) -> None:
    """Refuse to resume a run under other settings (its numbers would be neither run's)."""
    diffs = differences(info.get("run", {}), now)
    if diffs:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise HippError(f"cannot resume {path}: the run's settings changed, {diffs[0]}{more}; "
                        "restore them or start a new --output")


def check_output(out: Path, command: str, resume: bool, overwrite: bool, legacy=None) -> None:
    """Read-only checks of a training run's output folder, made on every process before anything
    loads: the command may write it (storage.outputs.check), --resume finds a state there, and a
    non-empty folder needs --resume or --overwrite."""
    outputs.check(out, command, overwrite, legacy=legacy)
    if resume:
        if not (out / STATE_NAME).is_file():
            old = " (its state is an earlier release's pickled one, which HiPP no longer loads)" \
                if (out / LEGACY_STATE_DIR).is_dir() else ""
            raise HippError(f"nothing to resume in {out}: no {STATE_NAME}{old}; choose a new --output")
    elif not overwrite and out.is_dir() and any(n != outputs.MARKER for n in os.listdir(out)):
        raise HippError(f"output folder {out} is not empty; pass --resume to continue its run, "
                        "--overwrite to start over in it, or choose another --output")


def truncate_log(log: Path, step: int) -> None:
    """Keep the log's rows up to `step` (rows after the last saved state, and a torn last line from a
    kill, go): a resumed run's log then holds each step once."""
    if not log.is_file():
        return
    keep = []
    for line in log.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line)
    write_text(log, "".join(line + "\n" for line in keep))
