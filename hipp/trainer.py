"""Training the controller on a frozen VLM with Accelerate.

Each step: one batch, one teacher pass (the same weights with gates open), then for each
preference group a Dirichlet-sampled preference, Gumbel-sigmoid gates from the controller, a
gated (student) pass and the scalarised multi-objective loss. Only the controller learns.

With `target_prob` > 0 some preference groups train for a FLOPs target instead: the preference's
cost weights are dropped and a quadratic penalty holds the expected FLOPs ratio at a target drawn
from `target_range`, which the controller reads as an input (Controller, flops_target).

Every random draw (data, preferences, gate noise) comes from a generator seeded by
(seed, step, process), so `--resume` reproduces an uninterrupted run exactly.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .backends import clear_gates, image_size, make_prunable, set_gates
from .checkpoint import fingerprint, get_tokenizer, load_model, preprocess_cfg
from .controller import CONFIG_NAME, Controller, load_controller
from .data import to_input
from .data.mixed import MixedBatches
from .errors import HippError
from .fileio import write_json
from .gates import TemperatureSchedule, hard_plan, keep_prob, map_gates, sample_gates
from .objectives import COSTS, Embeddings, ObjectiveConfig, Objectives, check_target_objectives
from .preference import DEFAULT_OBJECTIVES, sample_dirichlet

STATE_DIR = "train_state"
LR_SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """Multiplier of the base learning rate at `step` (0-based). A function of the step alone, so a
    resumed run needs no scheduler state."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    raise HippError(f"unknown lr schedule {schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """`lr` times each parameter group's `lr_mult` (1 when it has none)."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


@dataclass
class ControllerCfg:
    hidden: int = 128
    rank: int = 16
    depth: int = 2
    init_bias: float = 3.0
    factorised: bool = True


@dataclass
class DataCfg:
    batch_size: int = 64  # per preference group: a step sees pref_groups batches
    shape_fraction: float = 0.5
    negatives: int = 2


@dataclass
class TrainConfig:
    model: str = "checkpoints/teacher-tiny"
    pretrained: str | None = None
    family: str | None = None  # open_clip, clip or siglip: refuse a model of another family
    output: str = "runs/hipp-tiny"
    channel_group: int = 1
    seed: int = 0
    steps: int = 600
    pref_groups: int = 2
    dirichlet_alpha: float = 0.5
    vertex_prob: float = 0.0   # chance a preference group is a simplex vertex (one objective alone)
    lr: float = 3e-3
    lr_schedule: str = "constant"  # or "cosine": decay to 0 over the steps (see lr_factor)
    bias_lr_mult: float = 1.0  # the per-unit biases learn this many times faster (Controller.param_groups)
    target_prob: float = 0.0   # chance a preference group trains for a FLOPs target (module doc)
    target_range: list = field(default_factory=lambda: [0.2, 0.9])  # targets drawn uniformly in it
    target_penalty: float = 20.0  # weight of (expected FLOPs ratio - target)^2
    weight_decay: float = 0.0
    temperature_start: float = 1.0
    temperature_end: float = 0.1
    grad_accum: int = 1
    mixed_precision: str = "no"
    save_every: int = 100
    tensorboard: bool = False
    controller: ControllerCfg = field(default_factory=ControllerCfg)
    data: DataCfg = field(default_factory=DataCfg)
    objectives: dict = field(default_factory=lambda: {"names": list(DEFAULT_OBJECTIVES)})

    def __post_init__(self):
        checks = {"steps": self.steps >= 1, "pref_groups": self.pref_groups >= 1, "lr": self.lr > 0,
                  "channel_group": self.channel_group >= 1, "grad_accum": self.grad_accum >= 1,
                  "save_every": self.save_every >= 1, "dirichlet_alpha": self.dirichlet_alpha > 0,
                  "vertex_prob": 0 <= self.vertex_prob <= 1, "bias_lr_mult": self.bias_lr_mult > 0,
                  "target_prob": 0 <= self.target_prob <= 1, "target_penalty": self.target_penalty > 0,
                  "target_range": _is_range(self.target_range),
                  "data.batch_size": self.data.batch_size >= 2,
                  "data.shape_fraction": 0 < self.data.shape_fraction <= 1,
                  "mixed_precision": self.mixed_precision in ("no", "bf16", "fp16"),
                  "lr_schedule": self.lr_schedule in LR_SCHEDULES}
        for key, ok in checks.items():
            if not ok:
                raise HippError(f"config key '{key}' has an invalid value")
        names = ObjectiveConfig.from_dict(self.objectives).names  # fail at load time, not after the model loads
        if self.target_prob > 0:
            check_target_objectives(names)
        self.target_range = [float(x) for x in self.target_range]


def _is_range(r) -> bool:
    try:
        lo, hi = (float(x) for x in r)
    except (TypeError, ValueError):
        return False
    return 0 < lo <= hi <= 1


class TrainingDiverged(HippError):
    pass


class Distiller:
    """The student-vs-teacher computation of one step, shared by training, checks and benchmarks."""

    def __init__(self, model, objectives: Objectives, tokenizer, preprocess_cfg: dict, device):
        self.model, self.objectives, self.tokenizer, self.pp, self.device = \
            model, objectives, tokenizer, preprocess_cfg, device
        self.scale = model.logit_scale.exp().detach()

    def inputs(self, batch) -> tuple:
        images = to_input(batch.images, self.pp).to(self.device)
        tokens = self.tokenizer(batch.captions).to(self.device)
        neg = self.tokenizer(batch.negatives).to(self.device) if batch.negatives else None
        return images, tokens, neg

    def encode(self, inputs, batch) -> tuple:
        """Normalised image, caption and hard-negative embeddings ([n_shapes, n_negatives, D])."""
        images, tokens, neg_tokens = inputs
        img = self.model.encode_image(images, normalize=True)
        txt = self.model.encode_text(tokens, normalize=True)
        neg = None
        if neg_tokens is not None:
            neg = self.model.encode_text(neg_tokens, normalize=True).view(batch.n_shapes, batch.n_negatives, -1)
        return img, txt, neg

    @torch.no_grad()
    def teacher(self, inputs, batch) -> tuple:
        clear_gates(self.model)  # the teacher: the same frozen weights, gates open
        return self.encode(inputs, batch)

    def losses(self, logits, gates, inputs, teacher: tuple, batch) -> dict[str, torch.Tensor]:
        """Objectives of the student under `gates`; expected costs from the logits' keep-probabilities."""
        set_gates(self.model, *gates)
        student = self.encode(inputs, batch)
        clear_gates(self.model)

        def views(img, txt, neg):  # utility sees the whole batch; grounding the scenes with negatives
            n = batch.n_shapes
            return Embeddings(img, txt, neg), Embeddings(img[:n], txt[:n], neg)
        (s_all, s_g), (t_all, t_g) = views(*student), views(*teacher)
        return self.objectives.losses(map_gates(keep_prob, logits), s_all, t_all, self.scale, (s_g, t_g))


def sample_preferences(cfg: TrainConfig, k: int, g: torch.Generator) -> torch.Tensor:
    """Dirichlet preferences; some replaced by vertices, which Dirichlet alone almost never reaches,
    so that a preference for one objective alone is trained, not extrapolated."""
    prefs = sample_dirichlet(cfg.pref_groups, cfg.dirichlet_alpha, k, generator=g)
    vertex = torch.rand(cfg.pref_groups, generator=g) < cfg.vertex_prob
    corners = torch.nn.functional.one_hot(torch.randint(k, (cfg.pref_groups,), generator=g), k).to(prefs)
    return torch.where(vertex[:, None], corners, prefs)


def sample_targets(cfg: TrainConfig, prefs: torch.Tensor, names, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """FLOPs targets for some groups (NaN for the rest); those groups' cost weights are dropped and
    the quality weights renormalised (equal when all were zero): the target is the cost term."""
    targets = torch.full((len(prefs),), math.nan)
    if cfg.target_prob == 0:  # no draws at all, so a run without targets keeps its random stream
        return prefs, targets
    lo, hi = cfg.target_range
    chosen = torch.rand(len(prefs), generator=g) < cfg.target_prob
    drawn = lo + (hi - lo) * torch.rand(len(prefs), generator=g)
    quality = torch.tensor([n not in COSTS for n in names], dtype=prefs.dtype)
    q = prefs * quality
    q = torch.where(q.sum(-1, keepdim=True) > 0, q, quality.expand_as(q))
    q = q / q.sum(-1, keepdim=True)
    return torch.where(chosen[:, None], q, prefs), torch.where(chosen, drawn, targets)


@torch.no_grad()
def hard_vs_sampled(distiller: Distiller, controller: Controller, batches: MixedBatches, temperature: float,
                    n_prefs: int = 8, n_batches: int = 2, alpha: float = 0.5, seed: int = 0) -> dict:
    """Utility loss under deterministic hard plans vs under sampled gates, same preferences and
    held-out batches: how much is lost when the stochastic gates of training are hardened."""
    g = torch.Generator().manual_seed(seed)
    prefs = sample_dirichlet(n_prefs, alpha, len(distiller.objectives.names), generator=g)
    hard, sampled = [], []
    for b in range(n_batches):
        batch = batches(10**7 + b)  # far from every training index
        inputs = distiller.inputs(batch)
        teacher = distiller.teacher(inputs, batch)
        for p in prefs.to(distiller.device):
            logits = controller(p)
            sampled.append(distiller.losses(logits, sample_gates(logits, temperature, g), inputs, teacher, batch))
            hard.append(distiller.losses(logits, hard_plan(logits), inputs, teacher, batch))
    names = [n for n in ("utility", "grounding") if n in distiller.objectives.names]
    mean = lambda rows, n: float(sum(float(r[n]) for r in rows) / len(rows))  # noqa: E731
    return {f"{n}_{kind}": mean(rows, n) for n in names for kind, rows in (("hard", hard), ("sampled", sampled))}


def _save_state(acc: Accelerator, out: Path, step: int, seconds: float) -> None:
    """Accelerate's save_state into a fresh folder, swapped in only once it is complete."""
    final, tmp, old = out / STATE_DIR, out / f"{STATE_DIR}.tmp", out / f"{STATE_DIR}.old"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    if acc.is_main_process:
        write_json(tmp / "progress.json", {"step": step, "seconds": seconds})
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _resume_dir(out: Path) -> Path | None:
    for name in (STATE_DIR, f"{STATE_DIR}.old"):  # .old survives a crash between the two renames
        if (out / name / "progress.json").is_file():
            return out / name
    return None


def _last_step(out: Path) -> int:
    state = _resume_dir(out)
    return json.loads((state / "progress.json").read_text())["step"] if state else 0


def train(cfg: TrainConfig, resume: bool = False, max_steps: int | None = None) -> dict:
    out = Path(cfg.output)
    objectives_cfg = ObjectiveConfig.from_dict(cfg.objectives)
    model = load_model(cfg.model, cfg.pretrained, expect=cfg.family)
    base_print = fingerprint(model)
    if out.exists() and not out.is_dir():
        raise HippError(f"output {out} is a file")
    if resume:
        if not (out / CONFIG_NAME).is_file():
            raise HippError(f"nothing to resume in {out} (no {CONFIG_NAME})")
        load_controller(out, fingerprint=base_print)  # refuses a folder trained on another model
    elif out.is_dir() and any(out.iterdir()):
        raise HippError(f"output folder {out} is not empty; pass --resume or choose another --output")

    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                      log_with="tensorboard" if cfg.tensorboard else None, project_dir=str(out))
    space = make_prunable(model, cfg.channel_group)
    model.to(acc.device)
    pp, tokenizer = preprocess_cfg(model), get_tokenizer(cfg.model)
    objectives = Objectives(objectives_cfg, space)
    torch.manual_seed(cfg.seed)  # controller initialisation, identical on every process
    controller = Controller(space, objectives.names, **asdict(cfg.controller), flops_target=cfg.target_prob > 0)
    opt = torch.optim.AdamW(controller.param_groups(cfg.bias_lr_mult), lr=cfg.lr, weight_decay=cfg.weight_decay)
    controller, opt = acc.prepare(controller, opt)
    raw = acc.unwrap_model(controller)
    extra = {"base_model": str(cfg.model), "pretrained": cfg.pretrained, "family": cfg.family,
             "channel_group": cfg.channel_group,
             "train_config": asdict(cfg)}
    temperature = TemperatureSchedule(cfg.temperature_start, cfg.temperature_end, cfg.steps)
    batches = MixedBatches(cfg.seed + 1, cfg.data.batch_size, cfg.data.shape_fraction, cfg.data.negatives,
                           image_size(model))
    distiller = Distiller(model, objectives, tokenizer, pp, acc.device)

    start, elapsed = 0, 0.0
    state = _resume_dir(out) if resume else None
    if state is not None:
        acc.load_state(str(state))
        progress = json.loads((state / "progress.json").read_text())
        start, elapsed = progress["step"], progress["seconds"]
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if start == 0:
            raw.save(out, fingerprint=base_print, extra=extra)
    if cfg.tensorboard:
        acc.init_trackers("hipp", config={"steps": cfg.steps, "lr": cfg.lr})
    stop = min(cfg.steps, max_steps) if max_steps else cfg.steps
    log = out / "train_log.jsonl"
    bar = tqdm(range(start, stop), initial=start, total=stop, desc="controller", disable=not acc.is_main_process)
    t0 = time.time() - elapsed
    k = len(objectives.names)
    for step in bar:
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 64 + acc.process_index)
        prefs, targets = sample_targets(cfg, sample_preferences(cfg, k, g), objectives.names, g)
        prefs = prefs.to(acc.device)
        groups = []  # each preference group on a batch of its own
        for i in range(len(prefs)):
            batch = batches((step * acc.num_processes + acc.process_index) * cfg.pref_groups + i)
            inputs = distiller.inputs(batch)
            groups.append((batch, inputs, distiller.teacher(inputs, batch)))
        with acc.accumulate(controller), acc.autocast():
            total, terms = 0.0, {n: 0.0 for n in objectives.names}
            for p, t, (batch, inputs, teacher) in zip(prefs, targets.tolist(), groups):
                logits = controller(p, t if raw.takes_target else None)
                losses = distiller.losses(logits, sample_gates(logits, temperature(step), g), inputs, teacher, batch)
                loss = objectives.scalarize(losses, p)
                if math.isfinite(t):
                    loss = loss + cfg.target_penalty * (losses["flops"] - t) ** 2
                total = total + loss / len(prefs)
                for n in objectives.names:
                    terms[n] += float(losses[n].detach()) / len(prefs)
            if not torch.isfinite(total):
                raise TrainingDiverged(f"loss became {float(total)} at step {step + 1}; stopped, the last good "
                                       f"checkpoint in {out} is kept (step {_last_step(out)})")
            acc.backward(total)
            set_lr(opt, cfg.lr * lr_factor(cfg.lr_schedule, step, cfg.steps))
            opt.step()
            opt.zero_grad()
        row = {"step": step + 1, "loss": float(total.detach()), "temperature": temperature(step),
               "lr": opt.param_groups[0]["lr"], **terms}
        bar.set_postfix({n: f"{v:.3f}" for n, v in terms.items()})
        if acc.is_main_process:
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if cfg.tensorboard:
            acc.log(row, step=step + 1)
        if (step + 1) % cfg.save_every == 0 or step + 1 == stop:
            _save_state(acc, out, step + 1, time.time() - t0)
            if acc.is_main_process:
                raw.save(out, fingerprint=base_print, extra=extra)
    seconds = time.time() - t0
    if cfg.tensorboard:
        acc.end_training()
    summary = {"output": str(out), "steps": stop, "train_seconds": seconds,
               "controller_params": raw.num_parameters(), "controller_size_ratio": raw.size_ratio()}
    if stop == cfg.steps and acc.is_main_process:
        summary["end_of_training"] = hard_vs_sampled(distiller, raw, batches, cfg.temperature_end,
                                                     alpha=cfg.dirichlet_alpha, seed=cfg.seed)
        write_json(out / "training_summary.json", summary)
    return summary
