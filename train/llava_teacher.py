"""Training the embedded LLaVA teacher: the CLIP teacher's vision tower, a fresh projector and a small
Llama decoder (grouped-query attention, SwiGLU), taught to answer on the shape scenes and
Fashion-MNIST (captions, attribute questions, POPE existence questions, "What is this?").

The loss is the next-token cross-entropy on answer tokens only, averaged within each answer and
then over answers (`loss_average: sample`), so a one-word POPE answer weighs as much as a caption;
`token` averages over all answer tokens of the batch, as a causal LM's own loss does; `mixed` is the
mean of the two (captions, whose tokens teach which attributes go with which object, keep their
weight, and short answers get theirs). `pointing_weight` adds an auxiliary loss on where the answer
looks: in the first `pointing_heads` heads of each of `pointing_layers`, the token that predicts the
answer should put its attention on the patches of the object the question names (attribute questions,
POPE probes whose object is present), -log of the attention mass there. It is a teacher-training aid
only: the decoder otherwise learns to select an object by its colour or shape very slowly
(docs/studies/llava-teacher.md), and the saved model has no trace of it. Batch `step` is a pure function
of (seed, step), so a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from hipp.backends.convert import to_hf_clip
from hipp.backends.hf import quiet
from hipp.errors import HippError
from hipp.data.instruct import make_samples
from hipp.data.words import build_processor, build_tokenizer, encode
from hipp.storage.checkpoint import CONFIG_NAME, load_model, preprocess_cfg
from hipp.storage.fileio import read_json, write_json
from hipp.training import resume as resume_state


LOSS_AVERAGES = ("sample", "token", "mixed")


@dataclass
class LlavaTeacherConfig:
    clip_teacher: str = "checkpoints/teacher-tiny"
    decoder: dict = field(default_factory=dict)  # transformers LlamaConfig fields (sizes, rope)
    vision_feature_layer: int = -1
    output: str = "checkpoints/llava-tiny"
    seed: int = 0
    steps: int = 2000
    batch_size: int = 48
    lr: float = 1.0e-3
    vision_lr: float = 2.0e-4  # the converted tower starts trained: it moves more slowly
    min_lr: float = 1.0e-5
    warmup_steps: int = 100
    weight_decay: float = 0.05
    eval_every: int = 500
    eval_samples: int = 300
    save_every: int = 100
    loss_average: str = "sample"  # "sample", "token" or "mixed" (their mean; see the module docstring)
    prompt_tokens: int = 96  # declared prompt length for costs: 64 image tokens + the longest question
    pointing_weight: float = 0.0  # the auxiliary attention loss (module docstring); 0: off
    pointing_layers: list = field(default_factory=lambda: [1, 2])
    pointing_heads: int = 1

    def __post_init__(self):
        from hipp.config import check_values, one_of

        check_values({"loss_average": (self.loss_average, one_of(LOSS_AVERAGES))})


def lr_scale(cfg: LlavaTeacherConfig, step: int) -> float:
    """Warm-up then cosine, as a factor of each group's peak rate."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.min_lr / cfg.lr
    return floor + 0.5 * (1 - floor) * (1 + math.cos(math.pi * t))


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, average: str) -> torch.Tensor:
    """Next-token cross-entropy over the positions whose label is not -100."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != -100
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none") * mask
    token = nll.sum() / mask.sum().clamp(min=1)
    sample = (nll.sum(1) / mask.sum(1).clamp(min=1)).mean()
    return {"token": token, "sample": sample, "mixed": 0.5 * (token + sample)}[average]


def pointing_targets(samples, image_size: int, patch: int) -> torch.Tensor:
    """[N, patches] 1 on the patches of the object each sample's question names, 0 elsewhere; a row of
    zeros where the question names none (captions, counts, absent POPE objects, Fashion-MNIST)."""
    from hipp.data.shapes import object_patches

    side = image_size // patch
    out = torch.zeros(len(samples), side * side)
    for i, s in enumerate(samples):
        objs = s.meta.get("objects", [])
        if "target" in s.meta:
            named = [s.meta["target"]]
        elif s.meta.get("present"):
            named = [o for o in objs if (o.color, o.shape) == tuple(s.meta["pair"])]
        else:
            named = []
        for o in named:
            out[i, object_patches(o, image_size, patch)] = 1.0
    return out


def check_pointing(cfg: LlavaTeacherConfig, text_config) -> None:
    layers, heads = text_config.num_hidden_layers, text_config.num_attention_heads
    if not (cfg.pointing_layers and all(isinstance(k, int) and 0 <= k < layers for k in cfg.pointing_layers)
            and isinstance(cfg.pointing_heads, int) and 0 < cfg.pointing_heads <= heads):
        raise HippError(f"pointing_layers must be decoder layers in 0..{layers - 1} and pointing_heads in "
                        f"1..{heads}, got {cfg.pointing_layers} and {cfg.pointing_heads}")


def pointing_loss(attentions, input_ids, labels, targets, image_token_id: int, layers, heads: int) -> torch.Tensor:
    """Mean -log(attention mass on the named object's patches) of the token before each answer, over the
    supervised heads and the samples that name an object; 0 when none does."""
    rows = targets.sum(1) > 0
    if not rows.any():
        return attentions[0].sum() * 0.0
    query = (labels != -100).float().argmax(1) - 1  # the last prompt token predicts the answer's first word
    image = (input_ids == image_token_id).nonzero()[:, 1].view(len(input_ids), -1)  # image positions, patch order
    losses = []
    for layer in layers:
        a = attentions[layer][torch.arange(len(query)), :heads, query]  # [N, heads, T]
        on_image = a.gather(2, image[:, None, :].expand(-1, a.shape[1], -1))  # [N, heads, patches]
        mass = (on_image * targets[:, None, :].to(a.dtype)).sum(-1)
        losses.append(-torch.log(mass[rows].clamp(min=1e-6)).mean())
    return torch.stack(losses).mean()


def build(cfg: LlavaTeacherConfig, tokenizer):
    """A LlavaForConditionalGeneration whose vision tower holds the CLIP teacher's image tower."""
    import transformers

    model_cfg = read_json(Path(cfg.clip_teacher) / CONFIG_NAME)["model_cfg"]
    clip = to_hf_clip(load_model(cfg.clip_teacher, expect="open_clip"), model_cfg)
    text = transformers.LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                    **cfg.decoder)
    config = transformers.LlavaConfig(vision_config=clip.config.vision_config.to_dict(), text_config=text.to_dict(),
                                      image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                      vision_feature_layer=cfg.vision_feature_layer,
                                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    config.hipp_prompt_tokens = cfg.prompt_tokens
    torch.manual_seed(cfg.seed)
    with quiet():
        model = transformers.LlavaForConditionalGeneration(config)
    tower = model.model.vision_tower
    getattr(tower, "vision_model", tower).load_state_dict(clip.vision_model.state_dict(), strict=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def param_groups(model, cfg: LlavaTeacherConfig) -> list[dict]:
    groups = {}
    for name, p in model.named_parameters():
        vision = "vision_tower" in name
        decay = p.ndim >= 2 and "embed" not in name
        groups.setdefault((vision, decay), []).append(p)
    return [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0,
             "peak": cfg.vision_lr if vision else cfg.lr} for (vision, decay), ps in groups.items()]


def save_final(model, processor, out: Path) -> None:
    """fp16 weights, config, tokenizer and processor files, each moved into `out` whole."""
    stage = out / ".final-partial"
    shutil.rmtree(stage, ignore_errors=True)
    half = type(model)(model.config)
    half.load_state_dict(model.state_dict())
    with quiet():
        half.half().save_pretrained(str(stage), safe_serialization=True)
    processor.save_pretrained(str(stage))
    for name in sorted(os.listdir(stage)):
        os.replace(stage / name, out / name)
    stage.rmdir()


def train_llava_teacher(cfg: LlavaTeacherConfig, resume: bool = False) -> dict:
    out = Path(cfg.output)
    acc = Accelerator()
    tokenizer = build_tokenizer()
    pp = preprocess_cfg(load_model(cfg.clip_teacher, expect="open_clip"))
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    processor = build_processor(tokenizer, image_size=size, patch_size=8, mean=pp["mean"], std=pp["std"])
    model = build(cfg, tokenizer)
    if cfg.pointing_weight:
        check_pointing(cfg, model.config.text_config)
        model.set_attn_implementation("eager")  # the pointing loss reads attention weights
    groups = param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    model, opt = acc.prepare(model, opt)
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
            log.unlink()
        resume_state.truncate_log(log, start)
    acc.wait_for_everyone()
    per_process = cfg.batch_size // acc.num_processes
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="llava teacher",
               disable=not acc.is_main_process)
    t0 = time.time() - elapsed
    for step in bar:
        model.train()
        first = step * cfg.batch_size + acc.process_index * per_process
        samples = make_samples("train", per_process, seed=cfg.seed, start=first)
        batch = encode(processor, samples, train=True)
        for g in opt.param_groups:
            g["lr"] = g["peak"] * lr_scale(cfg, step)
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        result = model(**batch, output_attentions=bool(cfg.pointing_weight))
        loss = answer_loss(result.logits, labels, cfg.loss_average)
        row = {}
        if cfg.pointing_weight:
            point = pointing_loss(result.attentions, batch["input_ids"], labels,
                                  pointing_targets(samples, size, processor.patch_size).to(acc.device),
                                  acc.unwrap_model(model).config.image_token_id, cfg.pointing_layers,
                                  cfg.pointing_heads)
            row["pointing"] = point.item()
            loss = loss + cfg.pointing_weight * point
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        row = {**row, "step": step + 1, "loss": loss.item(), "lr": cfg.lr * lr_scale(cfg, step), "seconds": time.time() - t0}
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and acc.is_main_process:
            from hipp.evaluation.generative import evaluate_generative

            row.update(evaluate_generative(acc.unwrap_model(model).eval(), processor, split="val",
                                           n=cfg.eval_samples, latency=False)["metrics"])
            bar.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
        if acc.is_main_process:
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps) and acc.is_main_process:
            resume_state.save(state_path, acc.unwrap_model(model), opt,
                              {"step": step + 1, "seconds": time.time() - t0, "run": run})
    seconds = time.time() - t0
    if acc.is_main_process:
        acc.unwrap_model(model).set_attn_implementation("sdpa")
        save_final(acc.unwrap_model(model).eval(), processor, out)
        write_json(out / "train_config.json", {**asdict(cfg), "train_seconds": seconds})
    return {"train_seconds": seconds}
