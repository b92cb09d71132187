"""Pretraining the embedded teacher: contrastive image-caption learning with hard negatives.

Batches mix procedural shape scenes and Fashion-MNIST. Each batch is a pure function of
(seed, step), so a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import open_clip
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from hipp.backends import get_backend
from hipp.storage.checkpoint import save_model
from hipp.data import to_input
from hipp.data.mixed import MixedBatches
from hipp.evaluation.evaluate import evaluate
from hipp.training import resume as resume_state
from hipp.storage.fileio import write_json


@dataclass
class TeacherConfig:
    model: dict
    preprocess: dict = field(default_factory=lambda: {"mean": [0.5] * 3, "std": [0.5] * 3})
    output: str = "checkpoints/teacher-tiny"
    seed: int = 0
    steps: int = 2400
    batch_size: int = 128
    shape_fraction: float = 0.5
    negatives_per_image: int = 2
    required_negatives: list[str] = field(default_factory=list)  # e.g. [shape]: the attribute binding needs most
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    eval_every: int = 400
    save_every: int = 200
    mixed_precision: str = "no"


def lr_at(cfg: TeacherConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, groups: list[str]) -> torch.Tensor:
    """Multi-positive InfoNCE both ways; txt holds the B batch captions, then extra hard negatives.

    Captions of the same group (same scene text, same Fashion-MNIST class) are all positives,
    so repeated classes in a batch are not pushed apart.
    """
    b = img.shape[0]
    logits = scale * img @ txt.T
    keys = {k: i for i, k in enumerate(dict.fromkeys(groups))}
    gid = torch.tensor([keys[k] for k in groups], device=img.device)
    pos = gid[:, None] == gid[None, :]
    pos_i2t = torch.cat([pos, torch.zeros(b, txt.shape[0] - b, dtype=torch.bool, device=img.device)], 1)

    def nce(lg, mask):
        return (lg.logsumexp(1) - lg.masked_fill(~mask, float("-inf")).logsumexp(1)).mean()

    return 0.5 * (nce(logits, pos_i2t) + nce(logits[:, :b].T, pos))


def train_teacher(cfg: TeacherConfig, resume: bool = False) -> dict:
    out = Path(cfg.output)
    acc = Accelerator(mixed_precision=cfg.mixed_precision)
    torch.manual_seed(cfg.seed)
    model = get_backend("open_clip").build(cfg.model)
    pp = {**open_clip.transform.PreprocessCfg().__dict__, **cfg.preprocess, "size": model.visual.image_size}
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.model["text_cfg"]["context_length"])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    model, opt = acc.prepare(model, opt)
    batches = MixedBatches(cfg.seed, cfg.batch_size, cfg.shape_fraction, cfg.negatives_per_image,
                           pp["size"] if isinstance(pp["size"], int) else pp["size"][0], cfg.required_negatives)
    state_path, start, elapsed = out / resume_state.STATE_NAME, 0, 0.0
    run = {**asdict(cfg), "num_processes": acc.num_processes}
    if resume and state_path.is_file():
        weights, opt_state, info = resume_state.load(state_path)
        resume_state.check_same_run(out, info, run)
        acc.unwrap_model(model).load_state_dict(weights, strict=True)
        opt.load_state_dict(opt_state)
        start, elapsed = int(info["step"]), float(info["seconds"])
    log = out / "train_log.jsonl"
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if start == 0 and log.exists():
            log.unlink()  # a fresh run starts a fresh log
        resume_state.truncate_log(log, start)
    acc.wait_for_everyone()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="teacher", disable=not acc.is_main_process)
    t0 = time.time() - elapsed
    for step in bar:
        model.train()
        batch = batches(step)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        with acc.autocast():
            raw = acc.unwrap_model(model)
            img = raw.encode_image(to_input(batch.images, pp).to(acc.device), normalize=True)
            txt = raw.encode_text(tokenizer(batch.captions + batch.negatives).to(acc.device), normalize=True)
            loss = contrastive_loss(img, txt, raw.logit_scale.exp().clamp(max=100), batch.groups)
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}", T=f"{raw.logit_scale.exp().item():.1f}")
        row = {"step": step + 1, "loss": loss.item(), "lr": lr_at(cfg, step), "seconds": time.time() - t0}
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and acc.is_main_process:
            model.eval()
            row.update(evaluate(raw, tokenizer, pp, n=300, fmnist_limit=2000))
            bar.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
        if acc.is_main_process:
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps) and acc.is_main_process:
            resume_state.save(state_path, acc.unwrap_model(model), opt,
                              {"step": step + 1, "seconds": time.time() - t0, "run": run})
    seconds = time.time() - t0
    raw = acc.unwrap_model(model).eval()
    if acc.is_main_process:
        save_model(raw, out, cfg.model, pp)
        write_json(out / "train_config.json", {**asdict(cfg), "train_seconds": seconds})
    return {"train_seconds": seconds}
