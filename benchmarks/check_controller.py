"""Measure what a trained controller delivers on its base model (the core issue's bars).

    python benchmarks/check_controller.py --controller runs/hipp-tiny [--points 11] [--out FILE]

1. A sweep of preferences from utility to flops: hard-plan FLOPs ratios, their span, and the
   Spearman correlation between the flops weight and the achieved ratio.
2. The plan `hipp query --max-flops 0.5` answers: shape zero-shot mean and Fashion-MNIST accuracy
   with hard gates on the frozen model, against the dense model, and a check that the weights are
   untouched (fingerprint before and after).
3. The end-of-training hard-vs-sampled utility losses the trainer recorded.
"""
import argparse
import json
from pathlib import Path

from hipp.backends import clear_gates, set_gates
from hipp.storage.checkpoint import fingerprint
from hipp.controller.files import load_controller
from hipp.evaluation.evaluate import evaluate
from hipp.storage.fileio import write_json
from hipp.evaluation.front import spearman
from hipp.core.preference import sweep
from hipp.query.bound import load_base, plan_for_budget


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--controller", default="runs/hipp-tiny")
    ap.add_argument("--points", type=int, default=11)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--out", help="write the figures as JSON here too")
    args = ap.parse_args()

    ctrl = load_controller(args.controller)
    base = load_base(ctrl, args.controller)  # checks the weights' fingerprint against the controller's
    model, tok, pp = base.model, base.tokenizer, base.preprocess_cfg

    prefs = sweep(ctrl.objective_names, "utility", "flops", args.points)
    k = ctrl.objective_names.index("flops")
    rows = [{"flops_weight": round(float(p[k]), 4), **{m: round(ctrl.plan(p).costs()[m], 4)
                                                       for m in ("flops_ratio", "params_ratio")}} for p in prefs]
    ratios = [r["flops_ratio"] for r in rows]
    result = {"sweep": rows, "flops_ratio_min": min(ratios), "flops_ratio_max": max(ratios),
              "spearman_weight_vs_flops": spearman([r["flops_weight"] for r in rows], ratios)}

    clear_gates(model)
    dense = evaluate(model, tok, pp)
    plan = plan_for_budget(ctrl, max_flops=args.budget, base=base)
    set_gates(model, *plan.gates)
    pruned = evaluate(model, tok, pp)
    clear_gates(model)
    result["budget_plan"] = {"preference": plan.preference, "flops_ratio": plan.costs()["flops_ratio"],
                             "params_ratio": plan.costs()["params_ratio"]}
    for key in ("shapes/zs_mean", "shapes/ground_mean", "shapes/i2t_r1", "fmnist/acc"):
        result["budget_plan"][key] = {"dense": dense[key], "pruned": pruned[key], "kept": pruned[key] / dense[key]}
    result["weights_untouched"] = fingerprint(model) == base.fingerprint
    summary = Path(args.controller) / "training_summary.json"
    if summary.is_file():
        result["training"] = json.loads(summary.read_text())
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
