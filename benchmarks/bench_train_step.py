"""Cost of one controller training step vs a dense forward + backward of the same model.

    python benchmarks/bench_train_step.py --model checkpoints/teacher-tiny [--batch 64] [--repeats 10]

Both sides see the same batch (images, captions, hard negatives). Dense: every weight trainable,
forward both towers, contrastive loss, backward. HiPP: the teacher pass (no grad), controller ->
Gumbel gates, gated student pass, all objectives, backward to the controller, optimiser step.
Runs are interleaved and the medians compared, so machine noise hits both sides alike.
"""
import argparse
import json
import statistics
import time

import torch

from hipp.backends import clear_gates, image_size, make_prunable
from hipp.storage.checkpoint import get_tokenizer, load_model, preprocess_cfg
from hipp.controller.network import Controller
from hipp.data.mixed import MixedBatches
from hipp.core.gates import sample_gates
from hipp.training.objectives import ObjectiveConfig, Objectives
from train.teacher import contrastive_loss
from hipp.training.trainer import Distiller


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="checkpoints/teacher-tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channel-group", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    model = load_model(args.model)
    space = make_prunable(model, args.channel_group)
    objectives = Objectives(ObjectiveConfig(), space)
    distiller = Distiller(model, objectives, get_tokenizer(args.model), preprocess_cfg(model), "cpu")
    controller = Controller(space, objectives.names, hidden=128, rank=16)
    opt = torch.optim.AdamW(controller.parameters(), lr=1e-3)
    batch = MixedBatches(0, args.batch, 0.5, 2, image_size(model))(0)
    inputs = distiller.inputs(batch)
    g = torch.Generator().manual_seed(0)
    pref = torch.tensor([0.5, 0.1, 0.3, 0.1])

    def hipp_step():
        teacher = distiller.teacher(inputs, batch)
        logits = controller(pref)
        losses = distiller.losses(logits, sample_gates(logits, 0.5, g), inputs, teacher, batch)
        objectives.scalarize(losses, pref).backward()
        opt.step()
        opt.zero_grad()

    def dense_step():
        clear_gates(model)
        model.requires_grad_(True)
        img, txt, neg = distiller.encode(inputs, batch)
        loss = contrastive_loss(img, torch.cat([txt, neg.flatten(0, 1)]), model.logit_scale.exp(), batch.groups)
        loss.backward()
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)

    times = {"dense": [], "hipp": []}
    for fn in (dense_step, hipp_step):  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in (("dense", dense_step), ("hipp", hipp_step)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    result = {"model": args.model, "batch": args.batch, "threads": torch.get_num_threads(),
              "dense_fwd_bwd_ms": round(med["dense"], 1), "hipp_step_ms": round(med["hipp"], 1),
              "ratio": round(med["hipp"] / med["dense"], 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
