"""Recovery: distil an exported (smaller) model back toward the base it was cut from, with Accelerate.

Each step: one batch of the task's training data, the base's outputs on it (frozen, no gradient), the
export's, and the loss of the model family (steps.py: embeddings for CLIP-style models, answer-token
distributions for a LLaVA), the controller's own utility and grounding objectives. Every weight of
the export learns (settings.py says why).

Validation utility (the task's val split) is measured before the first step and every `eval_every`
steps; the best weights so far are kept, and after `patience` evaluations without a better one the
run stops early. With `keep_grounding` (the default) weights whose validation grounding has fallen
below the export's own by more than `grounding_tolerance` are never the best, whatever their
utility: recovery must not buy utility with hallucination. The output folder is an ordinary export
of the best weights, loadable by `hipp.load_model`, with the run recorded in pruned_config.json
under "recovery".

Batch `i` of process `p` is a pure function of (seed, step, p) and the state file holds the weights,
the optimizer, the best weights' step and utility, so `--resume` after a kill ends where an
uninterrupted run ends.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from tqdm.auto import tqdm

from ..backends import image_size
from ..errors import HippError
from ..storage import outputs
from ..storage.checkpoint import PRUNED_CONFIG_NAME, PRUNED_FORMAT, PRUNED_WEIGHTS_NAME, family, fingerprint, load_model, look_up
from ..storage.fileio import load_tensors, read_json, save_tensors, write_json, write_text
from ..tasks import get_task
from ..training import resume as resume_state
from .settings import RecoverConfig
from .steps import step_for

COMMAND = "recover"
LOG_NAME = "recover_log.jsonl"
BEST_NAME = "best.safetensors"  # the best weights on validation so far (the state file holds the latest)


def read_export(folder) -> dict:
    """The export's pruned_config.json, or one line saying the folder is not an export."""
    folder = Path(folder)
    path = folder / PRUNED_CONFIG_NAME
    if not folder.is_dir() or not path.is_file():
        raise HippError(f"{folder} is not a HiPP export (no {PRUNED_CONFIG_NAME}); recover takes a folder "
                        "written by hipp export")
    config = read_json(path)
    if not isinstance(config, dict) or config.get("format") != PRUNED_FORMAT or not isinstance(config.get("base"), dict):
        raise HippError(f"{path} is not a HiPP export's config")
    return config


def load_base_of(export: Path, config: dict):
    """The export's base model, found as the export recorded it and checked by its weights' fingerprint."""
    base = config["base"]
    spec = look_up(str(base.get("model")), export)
    try:
        model = load_model(spec, base.get("pretrained"))
    except HippError as e:
        raise HippError(f"the export's base model {spec} cannot be loaded ({e})") from None
    got = fingerprint(model)
    if got != base.get("fingerprint"):
        raise HippError(f"the base model {spec} has weights fingerprint {got}; the export was cut from "
                        f"{base.get('fingerprint')}")
    return model.eval().requires_grad_(False)


def is_better(row: dict, best: dict, keep_grounding: bool, tolerance: float = 0.0) -> bool:
    """A new best: higher validation utility and, with `keep_grounding`, grounding not below the floor
    (the export's own, measured before the first step) by more than `tolerance`."""
    if row["val_utility"] <= best["utility"]:
        return False
    floor = best.get("grounding_floor")
    return not (keep_grounding and floor is not None and row.get("val_grounding", floor) < floor - tolerance)


def lr_at(cfg: RecoverConfig, step: int) -> float:
    """Linear warm-up, then constant or cosine decay to 0; a function of the step alone."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def recover(export, cfg: RecoverConfig, out, resume: bool = False, overwrite: bool = False) -> dict:
    export, out = Path(export), Path(out)
    config = read_export(export)
    if out.resolve() == export.resolve():
        raise HippError("--out must be another folder than the export it recovers")
    resume_state.check_output(out, COMMAND, resume, overwrite)
    # an emptied attention or MLP branch leaves its norm and zero-sized weights out of the graph
    acc = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
                      log_with="tensorboard" if cfg.tensorboard else None, project_dir=str(out))
    with contextlib.ExitStack() as held:
        if acc.is_main_process:
            held.enter_context(outputs.claim(out, COMMAND, overwrite))
        return _recover(cfg, acc, export, config, out, resume)


def _recover(cfg: RecoverConfig, acc: Accelerator, export: Path, config: dict, out: Path, resume: bool) -> dict:
    student = load_model(export)
    task = get_task(cfg.task, cfg.task_options)
    task.check_model(family(student))  # a recovery config for the other model family: one line
    teacher = load_base_of(export, config).to(acc.device)
    fam = step_for(cfg, student, teacher, export, acc.device)
    batches = task.batches(cfg.seed + 1, cfg.batch_size // acc.num_processes, image_size(student),
                           shape_fraction=cfg.shape_fraction, negatives=cfg.negatives)
    for name, param in student.named_parameters():
        param.requires_grad_(name.rsplit(".", 1)[-1] not in fam.frozen)
    student.train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    run = {**asdict(cfg), "export": config["base"].get("fingerprint"), "plan": config.get("structure"),
           "num_processes": acc.num_processes}
    state_path, log = out / resume_state.STATE_NAME, out / LOG_NAME
    start, elapsed, best = 0, 0.0, None
    if resume:
        weights, opt_state, info = resume_state.load(state_path)
        resume_state.check_same_run(out, info, run)
        student.load_state_dict(weights, strict=True)
        opt.load_state_dict(opt_state)
        start, elapsed, best = int(info["step"]), float(info["seconds"]), info.get("best")
    wrapped, opt = acc.prepare(fam.module, opt)
    raw = acc.unwrap_model(wrapped).model

    def validate() -> dict:
        """Validation utility and, where the task has hard negatives, grounding."""
        raw.eval()
        with torch.no_grad():
            metrics = task.metrics(raw, fam.processor, fam.pp, split="val", size=cfg.val_size)
        raw.train()
        out = {"val_utility": task.utility(metrics)}
        if task.grounding_key in metrics:
            out["val_grounding"] = float(metrics[task.grounding_key])
        return out

    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        outputs.mark(out, COMMAND)
        if start == 0:
            first = validate()
            best = {"step": 0, "utility": first["val_utility"], "evals_since": 0,
                    "grounding": first.get("val_grounding"), "grounding_floor": first.get("val_grounding")}
            save_tensors(out / BEST_NAME, raw.state_dict())
            resume_state.save(state_path, raw, opt, {"step": 0, "seconds": 0.0, "run": run, "best": best})
            write_text(log, json.dumps({"step": 0, **first}) + "\n")
        else:
            resume_state.truncate_log(log, start)
    acc.wait_for_everyone()
    before = _first_val(log)
    if cfg.tensorboard:
        acc.init_trackers("hipp-recover", config={"steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size})
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="recover",
               disable=not acc.is_main_process)
    t0, stopped = time.time() - elapsed, None
    for step in bar:
        total, terms = fam.loss(wrapped, batches(step * acc.num_processes + acc.process_index))
        if not torch.isfinite(total):
            raise HippError(f"the recovery loss became {float(total)} at step {step + 1}; stopped, the best "
                            f"weights so far are kept in {out / BEST_NAME}")
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        acc.backward(total)
        opt.step()
        opt.zero_grad()
        row = {"step": step + 1, "loss": float(total.detach()), "lr": lr_at(cfg, step), **terms}
        bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items()})
        if acc.is_main_process:
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                row.update(validate())
                if is_better(row, best, cfg.keep_grounding, cfg.grounding_tolerance):
                    best = {**best, "step": step + 1, "utility": row["val_utility"], "evals_since": 0,
                            "grounding": row.get("val_grounding")}
                    save_tensors(out / BEST_NAME, raw.state_dict())
                else:
                    best["evals_since"] += 1
                if cfg.patience and best["evals_since"] >= cfg.patience and step + 1 < cfg.steps:
                    stopped = step + 1
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if cfg.tensorboard:
                acc.log(row, step=step + 1)
            if (step + 1) % cfg.save_every == 0 or stopped or step + 1 == cfg.steps:
                resume_state.save(state_path, raw, opt, {"step": step + 1, "seconds": time.time() - t0,
                                                         "run": run, "best": best, "stopped": stopped})
        stopped = _agree(acc, stopped)
        if stopped:
            break
    seconds = time.time() - t0
    if cfg.tensorboard:
        acc.end_training()
    summary = {"out": str(out)}
    if acc.is_main_process:
        summary = _write_export(cfg, export, config, out, raw, best, before, stopped, seconds, fam.loss_name)
    acc.wait_for_everyone()
    return summary


def _first_val(log: Path) -> dict:
    """The validation figures measured before the first step (the log's first line)."""
    if not log.is_file():  # another process than the main one: the main one writes the export
        return {}
    with log.open() as f:
        first = json.loads(f.readline() or "{}")
    return {k: v for k, v in first.items() if k.startswith("val_")}


def _agree(acc: Accelerator, stopped: int | None) -> int | None:
    """The main process decides early stopping; every process must leave the loop at the same step."""
    if acc.num_processes == 1:
        return stopped
    flag = torch.tensor([stopped or 0], device=acc.device)
    return int(acc.reduce(flag, reduction="sum").item()) or None


def _write_export(cfg, export: Path, config: dict, out: Path, raw, best: dict, before, stopped, seconds,
                  loss: str) -> dict:
    """The best weights as an ordinary export in `out`: the export's own files, its config with the
    recovery recorded; every file written atomically, the weights last but one, the config last."""
    weights = load_tensors(out / BEST_NAME)
    for path in export.iterdir():
        if path.is_file() and path.name not in (PRUNED_CONFIG_NAME, PRUNED_WEIGHTS_NAME, outputs.MARKER):
            shutil.copyfile(path, out / path.name)
    save_tensors(out / PRUNED_WEIGHTS_NAME, weights)
    recovery = {"config": asdict(cfg), "steps_run": stopped or cfg.steps, "stopped_early": bool(stopped),
                "best_step": best["step"], "val_utility_before": before.get("val_utility"),
                "val_utility_after": best["utility"], "val_grounding_before": before.get("val_grounding"),
                "val_grounding_after": best.get("grounding"), "keep_grounding": cfg.keep_grounding,
                "seconds": seconds, "loss": loss + (
                    " + grounding" if cfg.grounding_weight > 0 else ""),
                "from_export": str(export), "previous_recovery": config.get("recovery")}
    write_json(out / PRUNED_CONFIG_NAME, {**config, "recovery": recovery})
    return {"out": str(out), **recovery}
