"""Training the controller on a frozen VLM with Accelerate.

Each step: one batch, one teacher pass (the same weights with gates open), then for each
preference group a Dirichlet-sampled preference, Gumbel-sigmoid gates from the controller (and,
where the space has a token level, its relaxed chunk gates: hipp/core/token_gates.py), a gated
(student) pass and the scalarised multi-objective loss. Only the controller learns.

With `target_prob` > 0 some preference groups train for a FLOPs target instead: the preference's
cost weights are dropped and a quadratic penalty holds the expected FLOPs ratio at a target drawn
from `target_range`, which the controller reads as an input (Controller, flops_target).

Every random draw (data, preferences, gate noise) comes from a generator seeded by
(seed, step, process), so `--resume` reproduces an uninterrupted run exactly.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..backends import clear_gates, gated, image_size, make_prunable
from ..storage.checkpoint import family, fingerprint, get_processor, get_tokenizer, load_model, preprocess_cfg
from ..controller.network import CONFIG_NAME, Controller
from ..data import to_input
from ..tasks import DEFAULT_TASK, Batches, get_task
from .sharding import average_gradients, shard_base, uses_fsdp
from ..errors import HippError
from ..storage import outputs
from . import resume as resume_state
from ..storage.fileio import write_json, write_text
from ..core import token_gates
from ..core.gates import TemperatureSchedule, hard_plan, keep_prob, map_gates, sample_gates
from .objectives import Embeddings, ObjectiveConfig, Objectives
from .settings import LR_SCHEDULES, TrainConfig
from ..core.preference import COSTS, sample_dirichlet
from ..core.latency import latency_for

LOG_NAME = "train_log.jsonl"


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

    def losses(self, logits, gates, inputs, teacher: tuple, batch, tokens=None) -> dict[str, torch.Tensor]:
        """Objectives of the student under `gates`; expected costs from the logits' keep-probabilities."""
        if tokens:
            raise HippError("a CLIP-style controller does not choose visual tokens; its plans take them in queries")
        with gated(self.model, gates):
            student = self.encode(inputs, batch)

        def views(img, txt, neg):  # utility sees the whole batch; grounding the scenes with negatives
            n = batch.n_shapes
            return Embeddings(img, txt, neg), Embeddings(img[:n], txt[:n], neg)
        (s_all, s_g), (t_all, t_g) = views(*student), views(*teacher)
        return self.objectives.losses(map_gates(keep_prob, logits), s_all, t_all, self.scale, (s_g, t_g))


def make_distiller(model, objectives: Objectives | None, spec, device):
    """The step's computation for the model's family: contrastive embeddings or generated answers."""
    if family(model) == "llava":
        from .generative import GenerativeDistiller
        return GenerativeDistiller(model, objectives, get_processor(spec), device)
    return Distiller(model, objectives, get_tokenizer(spec), preprocess_cfg(model), device)


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


def student_gates(controller, pref, target, generator, temperature: float, hard: bool = False) -> tuple:
    """(gates, token chunks or None, logits) of one preference (and FLOPs target, None: none): sampled
    from the controller (`hard`: its deterministic plan); the chunks as Distiller.losses takes them,
    relaxed rather than straight-through (hipp/core/token_gates.py says why)."""
    logits, chunk_logits = controller(pref, target, with_tokens=True)
    gates = hard_plan(logits) if hard else sample_gates(logits, temperature, generator)
    tokens = None
    if chunk_logits:  # drawn after the gates, so a run without tokens keeps its random stream
        tokens = (chunk_logits, [token_gates.hard(c) if hard else token_gates.sample(c, temperature, generator, hard=False)
                                 for c in chunk_logits])
    return gates, tokens, logits


def process_loss(cfg: TrainConfig, step: int, process: int, processes: int, controller, takes_target: bool,
                 distiller: Distiller, batches, temperature: float,
                 autocast=contextlib.nullcontext) -> tuple[torch.Tensor, dict[str, float]]:
    """Process `process`'s share of step `step`: its preferences (and targets), one batch per group
    (`batches`: index -> batch) and its gate noise, all drawn from one generator seeded by
    (seed, step, process); returns the loss averaged over its groups and each objective's average.
    A step's global batch is the union of the `processes` shares and DDP averages their gradients,
    so the step descends the mean of these losses over the processes (tests/test_trainer.py checks
    it). `autocast` wraps the student passes only: the teacher runs at full precision."""
    names = distiller.objectives.names
    g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 64 + process)
    prefs, targets = sample_targets(cfg, sample_preferences(cfg, len(names), g), names, g)
    prefs = prefs.to(distiller.device)
    groups = []  # each preference group on a batch of its own
    for i in range(len(prefs)):
        batch = batches((step * processes + process) * cfg.pref_groups + i)
        inputs = distiller.inputs(batch)
        groups.append((batch, inputs, distiller.teacher(inputs, batch)))
    with autocast():
        total, terms = 0.0, {n: 0.0 for n in names}
        for p, t, (batch, inputs, teacher) in zip(prefs, targets.tolist(), groups):
            gates, tokens, logits = student_gates(controller, p, t if takes_target else None, g, temperature)
            losses = distiller.losses(logits, gates, inputs, teacher, batch, tokens)
            loss = distiller.objectives.scalarize(losses, p)
            if math.isfinite(t):
                loss = loss + cfg.target_penalty * (losses["flops"] - t) ** 2
            total = total + loss / len(prefs)
            for n in names:
                terms[n] += float(losses[n].detach()) / len(prefs)
    return total, terms


@torch.no_grad()
def hard_vs_sampled(distiller: Distiller, controller: Controller, batches: Batches, temperature: float,
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
            for rows, is_hard in ((sampled, False), (hard, True)):
                gates, tokens, logits = student_gates(controller, p, None, g, temperature, is_hard)
                rows.append(distiller.losses(logits, gates, inputs, teacher, batch, tokens))
    names = [n for n in ("utility", "grounding") if n in distiller.objectives.names]
    mean = lambda rows, n: float(sum(float(r[n]) for r in rows) / len(rows))  # noqa: E731
    return {f"{n}_{kind}": mean(rows, n) for n in names for kind, rows in (("hard", hard), ("sampled", sampled))}


COMMAND = "train"


def _earlier_run(out: Path) -> bool:
    """A training folder from before output markers: it holds a controller."""
    return (out / CONFIG_NAME).is_file()


def _run_identity(cfg: TrainConfig, base_print: str, processes: int) -> dict:
    """What a resumed run must share with the run it continues (hipp.training.resume.check_same_run)."""
    run = asdict(cfg)
    if run["task"] == DEFAULT_TASK and not run["task_options"]:  # as a run from before tasks recorded it
        del run["task"], run["task_options"]
    if run["visual_tokens"] is None:  # as a run from before controllers chose tokens
        del run["visual_tokens"]
    return {**run, "base_fingerprint": base_print, "num_processes": processes}


def _gradients_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in module.parameters() if p.grad is not None)


def _start_output(out: Path, raw: Controller, opt, identity: dict, base_print: str, extra: dict,
                  start: int) -> None:
    """Main process: mark the folder as training's; a new run writes its step-0 state, initial
    controller and an empty log (replacing an earlier run's, when --overwrite started over), a
    resumed run cuts its log back to the state's step."""
    out.mkdir(parents=True, exist_ok=True)
    outputs.mark(out, COMMAND)
    log = out / LOG_NAME
    if start == 0:  # a state at step 0 too, so a run killed before its first save still resumes
        resume_state.save(out / resume_state.STATE_NAME, raw, opt, {"step": 0, "seconds": 0.0, "run": identity})
        raw.save(out, fingerprint=base_print, extra=extra)
        write_text(log, "")
    else:
        resume_state.truncate_log(log, start)


def train(cfg: TrainConfig, resume: bool = False, max_steps: int | None = None, overwrite: bool = False) -> dict:
    out = Path(cfg.output)
    if max_steps is not None and max_steps < 1:
        raise HippError(f"--max-steps must be at least 1, got {max_steps}")
    objectives_cfg = ObjectiveConfig.from_dict(cfg.objectives)
    resume_state.check_output(out, COMMAND, resume, overwrite, legacy=_earlier_run)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                      log_with="tensorboard" if cfg.tensorboard else None, project_dir=str(out))
    with contextlib.ExitStack() as held:
        if acc.is_main_process:  # one lock for the run; the other processes never write the folder
            held.enter_context(outputs.claim(out, COMMAND, overwrite, legacy=_earlier_run))
        return _train(cfg, acc, out, objectives_cfg, resume, max_steps)


def _train(cfg: TrainConfig, acc: Accelerator, out: Path, objectives_cfg, resume: bool, max_steps) -> dict:
    model = load_model(cfg.model, cfg.pretrained, expect=cfg.family, seed=cfg.seed)
    task = get_task(cfg.task, cfg.task_options)
    task.check_model(family(model))
    base_print = fingerprint(model)
    if cfg.visual_tokens and family(model) != "llava":
        raise HippError(f"visual_tokens: a controller chooses visual tokens for a LLaVA only, not a {family(model)} model")
    space = make_prunable(model, cfg.channel_group, tokens=cfg.visual_tokens or False)
    model.to(acc.device)
    latency = latency_for(space, cfg.latency_profile) if cfg.latency_profile else None
    objectives = Objectives(objectives_cfg, space, latency)
    scores = None
    if cfg.controller.visual_sensitivity:
        if family(model) != "llava":
            raise HippError(f"controller.visual_sensitivity needs a LLaVA (the signal is its decoder's image "
                            f"attention), not this {family(model)} model")
        from .sensitivity import image_attention, layer_scores
        scores = layer_scores(space, image_attention(model.eval(), get_processor(cfg.model), image_size(model)))
    torch.manual_seed(cfg.seed)  # controller initialisation, identical on every process
    controller = Controller(space, objectives.names, **asdict(cfg.controller), flops_target=cfg.target_prob > 0)
    if scores is not None:
        controller.set_sensitivity(scores)
    opt = torch.optim.AdamW(controller.param_groups(cfg.bias_lr_mult), lr=cfg.lr, weight_decay=cfg.weight_decay)
    identity = _run_identity(cfg, base_print, acc.num_processes)
    start, elapsed = 0, 0.0
    if resume:
        state_path = out / resume_state.STATE_NAME
        weights, opt_state, info = resume_state.load(state_path)
        resume_state.check_same_run(out, info, identity)
        try:
            controller.load_state_dict(weights, strict=True)
            opt.load_state_dict(opt_state)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise HippError(f"{state_path} does not fit this run's controller ({str(e).splitlines()[0]})") from None
        start, elapsed = int(info["step"]), float(info["seconds"])
    sharded = uses_fsdp(acc)
    if sharded:  # the base sharded, the controller whole on every process (sharding.py)
        shard_base(acc, model)
    else:
        controller, opt = acc.prepare(controller, opt)
    acc.step = start  # gradient accumulation counts from the resumed step, as the uninterrupted run did
    raw = acc.unwrap_model(controller)
    extra = {"base_model": str(cfg.model), "pretrained": cfg.pretrained, "family": cfg.family,
             "channel_group": cfg.channel_group,
             "train_config": asdict(cfg), **({"latency_profile": latency.profile} if latency else {})}
    temperature = TemperatureSchedule(cfg.temperature_start, cfg.temperature_end, cfg.steps)
    batches = task.batches(cfg.seed + 1, cfg.data.batch_size, image_size(model),
                           shape_fraction=cfg.data.shape_fraction, negatives=cfg.data.negatives)
    distiller = make_distiller(model, objectives, cfg.model, acc.device)
    if acc.is_main_process:
        _start_output(out, raw, opt, identity, base_print, extra, start)
    acc.wait_for_everyone()
    last_saved = start
    if cfg.tensorboard:
        acc.init_trackers("hipp", config={"steps": cfg.steps, "lr": cfg.lr})
    stop = min(cfg.steps, max_steps) if max_steps else cfg.steps
    log = out / LOG_NAME
    bar = tqdm(range(start, stop), initial=start, total=stop, desc="controller", disable=not acc.is_main_process)
    t0 = time.time() - elapsed
    for step in bar:
        with acc.accumulate(controller):
            total, terms = process_loss(cfg, step, acc.process_index, acc.num_processes, controller,
                                        raw.takes_target, distiller, batches, temperature(step), acc.autocast)
            with acc.autocast():  # the rest of the step under the forward's precision, as it always ran
                if not torch.isfinite(total):
                    raise TrainingDiverged(f"loss became {float(total)} at step {step + 1}; stopped, the last "
                                           f"good checkpoint in {out} is kept (step {last_saved})")
                acc.backward(total)
                if sharded:
                    average_gradients(raw, acc.num_processes)
                if acc.scaler is None and not _gradients_finite(raw):  # fp16's scaler skips overflowing steps
                    raise TrainingDiverged(f"gradients became non-finite at step {step + 1}; stopped, the last "
                                           f"good checkpoint in {out} is kept (step {last_saved})")
                set_lr(opt, cfg.lr * lr_factor(cfg.lr_schedule, step, cfg.steps))
                if not sharded or acc.sync_gradients:  # a prepared optimizer skips accumulation steps itself
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
            # gradients accumulated in the middle of a window are not in the state: it is saved at sync steps
            synced = (step + 1) % cfg.grad_accum == 0
            if acc.is_main_process:  # the state first: the controller files then never run ahead of it
                if synced:
                    resume_state.save(out / resume_state.STATE_NAME, raw, opt,
                                      {"step": step + 1, "seconds": time.time() - t0, "run": identity})
                raw.save(out, fingerprint=base_print, extra=extra)
            last_saved = step + 1 if synced else last_saved
            acc.wait_for_everyone()
    seconds = time.time() - t0
    if cfg.tensorboard:
        acc.end_training()
    summary = {"output": str(out), "steps": stop, "train_seconds": seconds,
               "controller_params": raw.num_parameters(), "controller_size_ratio": raw.size_ratio()}
    if stop == cfg.steps and (acc.is_main_process or sharded):  # a sharded base's forwards are collective
        summary["end_of_training"] = hard_vs_sampled(distiller, raw, batches, cfg.temperature_end,
                                                     alpha=cfg.dirichlet_alpha, seed=cfg.seed)
        if acc.is_main_process:
            write_json(out / "training_summary.json", summary)
    return summary
