"""Choices on validation, figures on test, over training seeds: for each seed, the embedded recipe's
controller (configs/hipp_tiny.yaml with only `seed` and `output` changed), its bound-query plan at each
FLOPs budget and that plan polished (`hipp.query.polish.polish`, keep-if-better), each measured on
the validation split (val shape scenes, the last Fashion-MNIST train images) and on the test sets,
with utility also on held-out prompt templates (hipp.evaluation.evaluate.HELDOUT_*).

    python benchmarks/seed_validation.py --seeds 0,1,2,3,4 --budgets 0.3,0.5,0.7 --out runs/seed-validation

Every (seed, budget) result is saved in --out as it is measured and reused by a rerun, so a stopped
run continues where it was. The decision rule printed at the end: polishing is on by default only at
budgets where it raises validation utility for most seeds.
"""
import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from hipp.config import load_config
from hipp.controller.files import load_controller
from hipp.evaluation.pareto import evaluate_plan, utility_difference
from hipp.query.bound import load_base, plan_for_budget
from hipp.query.polish import polish
from hipp.storage.fileio import write_json, write_text
from hipp.training.trainer import TrainConfig, train

HELDOUT = ("shapes/zs_heldout_prompts", "fmnist/acc_heldout_prompts")
SPLITS = {"val": dict(n=1000, fmnist_limit=None, split="val"), "test": dict(n=1000, fmnist_limit=None, split="test")}


def controller_for(config: str, seed: int, out: Path) -> Path:
    folder = out / f"controller-seed{seed}"
    if not (folder / "training_summary.json").is_file():
        cfg = load_config(TrainConfig, config)
        cfg = dataclasses.replace(cfg, seed=seed, output=str(folder))
        train(cfg, resume=(folder / "train_state.safetensors").is_file(), overwrite=folder.is_dir())
    return folder


def measure(base, plan) -> dict:
    out = {}
    for name, kw in SPLITS.items():
        r = evaluate_plan(base.model, plan, base.tokenizer, base.preprocess_cfg, items=True, **kw)
        out[name] = {"utility": r["utility"], "heldout_utility": sum(r["metrics"][k] for k in HELDOUT) / len(HELDOUT),
                     "flops_ratio": r["flops_ratio"], "items": r["items"]}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/hipp_tiny.yaml")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--budgets", default="0.3,0.5,0.7")
    ap.add_argument("--polish", type=int, default=120)
    ap.add_argument("--out", default="runs/seed-validation")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    for seed in seeds:
        folder = controller_for(args.config, seed, out)
        base = controller = None
        for budget in budgets:
            cell = out / f"seed{seed}-{budget:g}.json"
            if cell.is_file():
                continue
            if base is None:
                controller = load_controller(folder)
                base = load_base(controller, folder)
            t = time.perf_counter()
            plan = plan_for_budget(controller, max_flops=budget, base=base)
            polished = polish(base, controller, plan, args.polish)
            row = {"seed": seed, "budget": budget, "polish_kept": polished.meta["polish"]["kept"]}
            plain_m, pol_m = measure(base, plan), measure(base, polished)
            for split in SPLITS:
                a, b = pol_m[split], plain_m[split]
                gain, se = utility_difference(a.pop("items"), b.pop("items"))
                row[split] = {"plain": b, "polished": a, "polish_gain": gain, "polish_gain_se": se}
            row["seconds"] = time.perf_counter() - t
            write_json(cell, row)
            print(json.dumps({k: row[k] for k in ("seed", "budget", "polish_kept")}
                             | {s: round(row[s]["polish_gain"], 4) for s in SPLITS}), flush=True)
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("seed*-*.json"))]
    lines = ["| budget | seeds | test utility, bound query (mean ± sd) | polished | held-out prompts, bound query | "
             "polishing raises val utility | polishing on? |", "|---|---|---|---|---|---|---|"]
    decision = {}
    for budget in budgets:
        at = [r for r in rows if r["budget"] == budget]
        if not at:
            continue
        ms = lambda xs: f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.4f}"  # noqa: E731
        wins = sum(r["val"]["polish_gain"] > 0 for r in at)
        decision[f"{budget:g}"] = wins > len(at) / 2
        lines.append(f"| {budget:g} | {len(at)} | {ms([r['test']['plain']['utility'] for r in at])} | "
                     f"{ms([r['test']['polished']['utility'] for r in at])} | "
                     f"{ms([r['test']['plain']['heldout_utility'] for r in at])} | {wins} of {len(at)} | "
                     f"{'yes' if decision[f'{budget:g}'] else 'no'} |")
    write_text(out / "summary.md", "\n".join(lines) + "\n")
    write_json(out / "summary.json", {"decision": decision, "rows": rows})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
