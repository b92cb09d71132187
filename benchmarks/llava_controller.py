"""A LLaVA controller measured: the utility -> FLOPs sweep of its preferences and its bound queries,
each plan materialised and answered greedily (hipp.evaluation.generative), against the dense teacher.

    python benchmarks/llava_controller.py --controller runs/hipp-llava-tiny --split val --n 100 \
        --budgets 0.3,0.5,0.7 --out runs/llava-controller-val

Prints and writes (--out: result.json, summary.md): per plan its FLOPs ratio, utility, POPE F1 per
sampling and their shares of the teacher's; the rank correlations of the sweep (FLOPs weight vs
FLOPs ratio, FLOPs ratio vs utility). Choices are made on --split val; --split test reports.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hipp.controller.files import load_controller  # noqa: E402
from hipp.core.preference import sweep  # noqa: E402
from hipp.evaluation.front import spearman  # noqa: E402
from hipp.evaluation.generative import evaluate_generative  # noqa: E402
from hipp.export.slicing import materialize  # noqa: E402
from hipp.query.bound import load_base, plan_for_budget  # noqa: E402
from hipp.storage.fileio import write_json, write_text  # noqa: E402

POPE = ("pope/random_f1", "pope/popular_f1", "pope/adversarial_f1")


def measure(base, plan, split: str, n: int) -> dict:
    small = materialize(base.model, plan).eval()
    rep = evaluate_generative(small, base.tokenizer, split=split, n=n, latency=False)
    costs = plan.costs()
    return {"flops_ratio": costs["flops_ratio"], "params_ratio": costs["params_ratio"], "utility": rep["utility"],
            **{k: rep["metrics"][k] for k in (*POPE, "attr/mean", "caption/f1", "fmnist/acc")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--controller", required=True)
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--n", type=int, default=100, help="samples of each kind")
    ap.add_argument("--points", type=int, default=11, help="preferences on the utility -> flops sweep")
    ap.add_argument("--budgets", default="0.3,0.5,0.7")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    controller = load_controller(args.controller)
    base = load_base(controller, args.controller)
    t0 = time.time()
    dense = evaluate_generative(base.model, base.tokenizer, split=args.split, n=args.n, latency=False)
    teacher = {"utility": dense["utility"], **{k: dense["metrics"][k] for k in POPE}}
    names = list(controller.objective_names)
    rows = []
    for p in sweep(names, "utility", "flops", args.points):
        plan = controller.plan(p)
        rows.append({"kind": "sweep", "flops_weight": float(p[names.index("flops")]), **measure(base, plan, args.split, args.n)})
        print(rows[-1], flush=True)
    for b in (float(x) for x in args.budgets.split(",") if x.strip()):
        plan = plan_for_budget(controller, max_flops=b, base=base)
        rows.append({"kind": "bound", "budget": b, "preference": plan.meta["search"]["candidates"][0]["preference"],
                     **measure(base, plan, args.split, args.n)})
        print(rows[-1], flush=True)
    for r in rows:
        r["utility_share"] = r["utility"] / teacher["utility"]
        r["pope_share_min"] = min(r[k] / teacher[k] for k in POPE)
    swept = [r for r in rows if r["kind"] == "sweep"]
    corr = {"flops_weight_vs_flops_ratio": spearman([r["flops_weight"] for r in swept], [r["flops_ratio"] for r in swept]),
            "flops_ratio_vs_utility": spearman([r["flops_ratio"] for r in swept], [r["utility"] for r in swept])}
    result = {"split": args.split, "n": args.n, "teacher": teacher, "rows": rows, "spearman": corr,
              "flops_span": [min(r["flops_ratio"] for r in swept), max(r["flops_ratio"] for r in swept)],
              "seconds": time.time() - t0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "result.json", result)
    lines = [f"teacher ({args.split}, {args.n} per kind): utility {teacher['utility']:.4f}, POPE F1 "
             + " / ".join(f"{teacher[k]:.3f}" for k in POPE), "",
             "| plan | FLOPs | utility | share | POPE F1 r / p / a | min POPE share |", "|---|---|---|---|---|---|"]
    for r in rows:
        name = f"sweep flops={r['flops_weight']:.2f}" if r["kind"] == "sweep" else f"bound {r['budget']}"
        lines.append(f"| {name} | {r['flops_ratio']:.3f} | {r['utility']:.4f} | {r['utility_share']:.3f} | "
                     + " / ".join(f"{r[k]:.3f}" for k in POPE) + f" | {r['pope_share_min']:.3f} |")
    lines += ["", f"sweep spans FLOPs {result['flops_span'][0]:.3f}-{result['flops_span'][1]:.3f}; Spearman "
              + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in corr.items())]
    write_text(out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
