"""Measured CPU speed-up of materialised models against their FLOPs ratio.

For each FLOPs bound r, the controller's plan (what `hipp query --max-flops r` returns) is
materialised and the image and text towers are timed separately at batch 32 against two references:
the project's dense materialisation (the all-kept plan: the same module classes, only the sizes
differ) and the stock model as a user has it (open_clip's own CLIP with nn.MultiheadAttention's
fast path, or transformers' own classes). Runs are interleaved (the order flips every round) so
that drift in machine load hits all alike; the median speed-up over each is printed beside the
plan's per-tower FLOPs ratio r and the ideal 1/r.

    python benchmarks/bench_speedup.py --controller runs/hipp-tiny --max-flops 0.3,0.5,0.7 [--threads 1]

Without a controller, `--model` times a baseline's plans (`--method`, uniform by default: the same share in every layer, so each tower lands near r) on any
model: an open_clip name with random weights (ViT-B-32: real widths, where matmuls dominate), or
`hf:clip` / `hf:siglip` for transformers' default CLIP ViT-B/32 / SigLIP base configs, randomly
initialised. Latency does not depend on the weights' values, only on the shapes.

    python benchmarks/bench_speedup.py --model ViT-B-32 --max-flops 0.3,0.5,0.7 --channel-group 64
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from hipp.backends import make_prunable
from hipp.baselines import make_plan
from hipp.controller.files import load_controller
from hipp.errors import HippError
from hipp.export.slicing import materialize
from hipp.core.plan import Plan
from hipp.evaluation.profile import Timer, measures_for
from hipp.query.bound import load_base, plan_for_budget
from hipp.query.tokens import counts, parse_shares, token_level
from hipp.storage.checkpoint import load_model


def random_model(spec: str) -> torch.nn.Module:
    """Randomly initialised: an open_clip name, or hf:clip / hf:siglip (transformers' default configs)."""
    if spec.startswith("hf:"):
        import transformers

        from hipp.backends.hf import HFVLM

        kind = spec[3:]
        if kind not in ("clip", "siglip"):
            raise HippError(f"unknown transformers family {kind!r}; use hf:clip or hf:siglip")
        hf = (transformers.CLIPModel(transformers.CLIPConfig()) if kind == "clip"
              else transformers.SiglipModel(transformers.SiglipConfig()))
        return HFVLM(hf).eval().requires_grad_(False)
    return load_model(spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--controller", help="trained controller folder: time its plans")
    p.add_argument("--model", help="without a controller: this model (see above) with --method's plans")
    p.add_argument("--method", default="uniform", help="baseline that plans for --model (no calibration)")
    p.add_argument("--channel-group", type=int, default=64, help="channel grouping for --model")
    p.add_argument("--max-flops", default="0.3,0.5,0.7", help="comma-separated FLOPs bounds")
    p.add_argument("--pref", action="append", default=[], help="also time this preference's plan (repeatable)")
    p.add_argument("--visual-tokens", metavar="S",
                   help="with --controller: also the joint weight + token plans at each bound (as hipp query's option)")
    p.add_argument("--base-model", help="override the controller's base model")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per model and tower")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON object")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        bounds = [float(r) for r in args.max_flops.split(",") if r.strip()]
        if args.controller:
            controller = load_controller(args.controller)
            base = load_base(controller, args.controller, args.base_model)
            model, space, spec = base.model, controller.space, base.spec
            plans = [(f"max_flops={r:g}", plan_for_budget(controller, max_flops=r, base=base)) for r in bounds]
            plans += [(f"pref {s}", controller.plan(s)) for s in args.pref]
            if args.visual_tokens:
                kept = counts(token_level(model), parse_shares(args.visual_tokens))
                plans += [(f"max_flops={r:g}+tokens", plan_for_budget(controller, max_flops=r, base=base,
                                                                      token_counts=kept)) for r in bounds]
        elif args.model:
            model, spec = random_model(args.model), args.model
            space = make_prunable(model, args.channel_group)
            plans = [(f"{args.method} {r:g}", make_plan(args.method, model, space, r)) for r in bounds]
        else:
            raise HippError("give --controller or --model")
    except (HippError, ValueError) as e:
        print(f"bench_speedup: error: {e}", file=sys.stderr)
        return 2

    stock = random_model(args.model) if args.model else load_model(base.spec)  # never made prunable
    timer = Timer(measures_for(stock, space, args.batch, torch.device("cpu")), torch.device("cpu"),
                  args.repeats, args.warmup)
    dense = materialize(model, Plan.dense(space)).eval()
    rows = []
    for name, plan in plans:
        small = materialize(model, plan).eval()
        costs = plan.costs()
        for tower in space.stages:
            ms_dense, ms_small, ms_stock = timer.times([dense, small, stock], tower)
            r = costs[f"flops_ratio/{tower}"]
            rows.append({"plan": name, "tower": tower, "flops_ratio": r, "latency_ratio": ms_small / ms_dense,
                         "speedup": ms_dense / ms_small, "stock_speedup": ms_stock / ms_small,
                         "ideal_speedup": 1 / r if r > 0 else float("inf"), "dense_ms": ms_dense,
                         "stock_ms": ms_stock, "pruned_ms": ms_small, "total_flops_ratio": costs["flops_ratio"]})
    info = {"batch": args.batch, "repeats": args.repeats, "threads": torch.get_num_threads(),
            "base_model": spec, "rows": rows}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"base {spec}, batch {args.batch}, {args.repeats} interleaved rounds, "
          f"{torch.get_num_threads()} threads; medians")
    print(f"{'plan':24s} {'tower':5s} {'flops r':>8s} {'lat ratio':>9s} {'speedup':>8s} {'vs stock':>8s} {'1/r':>6s} "
          f"{'dense ms':>9s} {'stock ms':>9s} {'pruned ms':>9s}")
    for row in rows:
        print(f"{row['plan']:24s} {row['tower']:5s} {row['flops_ratio']:8.3f} {row['latency_ratio']:9.3f} "
              f"{row['speedup']:8.2f} {row['stock_speedup']:8.2f} {row['ideal_speedup']:6.2f} {row['dense_ms']:9.2f} "
              f"{row['stock_ms']:9.2f} {row['pruned_ms']:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
