"""The teacher's model card: what it was trained on, how, and what the saved file measures."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from ..data.fashion_mnist import TEMPLATES
from ..data.shapes import HELD_OUT_PAIRS
from ..storage.checkpoint import get_tokenizer, load_model, preprocess_cfg
from .evaluate import report
from ..storage.fileio import write_json, write_text


def write_card(cfg, config_path: str, train_seconds: float) -> dict:
    out = Path(cfg.output)
    model = load_model(out)  # measure the fp16 file users get, not the in-memory fp32 weights
    rep = report(model, get_tokenizer(out), preprocess_cfg(model))
    rep["train_seconds"] = train_seconds
    write_json(out / "metrics.json", rep)
    m = rep["metrics"]
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in m.items())
    size_mb = (out / "open_clip_model.safetensors").stat().st_size / 2**20
    write_text(out / "MODEL_CARD.md", f"""# teacher-tiny

A small CLIP-style model (open_clip `CLIP`, ViT image tower, causal text transformer) trained by
this project from scratch, offline, as the frozen VLM that HiPP's tests, demo and benchmarks prune.

- Architecture: `{cfg.model}`
- Weights: `open_clip_model.safetensors`, fp16, {size_mb:.1f} MiB; {rep['params']:,} parameters.
  Also loadable with `open_clip.create_model("local-dir:checkpoints/teacher-tiny")`.
- FLOPs per sample: {', '.join(f"{s} {f / 1e6:.1f} M" for s, f in rep['flops'].items())}
  (analytic, checked against torch.utils.flop_counter in the tests).
- Latency (batch {rep['latency_ms']['batch']}, {torch.get_num_threads()} CPU threads, {platform.processor() or platform.machine()}):
  {', '.join(f"{s} {rep['latency_ms'][s]:.3f} ms" for s in rep['flops'])} per item.

## Data
- Procedural shape scenes (`hipp.data.shapes`): 64x64, 1-3 objects with colour (6), shape (5),
  size (2) and 3x3-grid position; compositional captions; hard negatives in the loss (attribute
  swapped between objects, one attribute replaced, an absent object named). Six colour-shape
  pairs never appear in train: {', '.join(' '.join(p) for p in sorted(HELD_OUT_PAIRS))}.
- Fashion-MNIST train (Debian `dataset-fashion-mnist`), upsampled to 64x64, captions from
  {len(TEMPLATES)} templates per class.

## Training
`python train/pretrain_teacher.py --config {config_path}` — {cfg.steps} steps of batch
{cfg.batch_size} ({cfg.shape_fraction:.0%} shape scenes, {cfg.negatives_per_image} hard negatives per
scene{', always including ' + ', '.join(cfg.required_negatives) if cfg.required_negatives else ''}), AdamW lr {cfg.lr} cosine, seed {cfg.seed}: {train_seconds / 60:.1f} minutes on this machine
({platform.machine()}, {torch.get_num_threads()} threads, CPU only).

## Measured (the saved fp16 checkpoint; `hipp eval --model {out} --json`)
Shape metrics use the test split (held-out colour-shape pairs included): zero-shot per attribute
on 1000 single-object scenes with a prompt ensemble per class; retrieval and grounding on 1000
multi-object pairs. Fashion-MNIST: the 10,000 test images against class prompt ensembles.

| metric | value |
|---|---|
{rows}
""")
    return rep
