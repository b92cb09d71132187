"""How much of the controller-vs-fixed-budget comparison is the training seed? Trains one controller per
seed from a config and one fixed-budget gate run per seed and budget (the controller's training
budget, as in `hipp bench`), measures each plan with the bench's evaluation (full test sets), and
prints both methods per seed with mean and standard deviation.

    python benchmarks/seed_spread.py --config configs/hipp_tiny.yaml --seeds 0,1,2 --out runs/seeds

Resumable: finished controllers and measured rows in --out are reused (results.json), so an
interrupted run continues where it stopped. About 5 min per controller and per fixed-budget run
on 2 cores: 3 seeds at 3 budgets take about 65 min; `--budgets 0.3` alone, 10 min a seed.
"""
import argparse
import dataclasses
import statistics
from pathlib import Path

from hipp.evaluation.bench import bench
from hipp.baselines.fixed_budget import matched_to
from hipp.config import load_config
from hipp.controller.files import load_controller
from hipp.storage.fileio import read_json, write_json, write_text
from hipp.query.bound import load_base, plan_for_budget
from hipp.training.trainer import TrainConfig, train

FIXED = "fixed_budget"


def controller_for(cfg: TrainConfig, seed: int, out: Path) -> Path:
    folder = out / f"controller-seed{seed}"
    if not (folder / "training_summary.json").is_file():
        run = dataclasses.replace(cfg, seed=seed, output=str(folder))
        train(run, resume=(folder / "controller.json").is_file())
    return folder


def rows_of(result: dict, method: str) -> dict:
    return {str(r["budget"]): {"utility": r["utility"], "flops_ratio": r["flops_ratio"],
                               "fmnist": r["metrics"].get("fmnist/acc"), "zs_mean": r["metrics"].get("shapes/zs_mean")}
            for r in result["results"] if r["method"] == method}


def table(results: dict, seeds: list[int], budgets: list[float]) -> str:
    lines = ["| budget | method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd |",
             "|---|---|" + "---|" * (len(seeds) + 2)]
    for b in budgets:
        means = {}
        for method in ("hipp", FIXED):
            xs = [results[f"{method}/{s}"][str(b)]["utility"] for s in seeds]
            means[method] = statistics.mean(xs)
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            lines.append(f"| {b} | {method} | " + " | ".join(f"{x:.3f}" for x in xs)
                         + f" | {means[method]:.3f} | {sd:.3f} |")
        lines.append(f"| {b} | gap of means | | " + " | " * (len(seeds) - 1)
                     + f"{100 * (means['hipp'] - means[FIXED]):+.1f} pts | |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/hipp_tiny.yaml")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budgets", default="0.3,0.5,0.7")
    ap.add_argument("--out", default="runs/seeds")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(TrainConfig, args.config)
    store = out / "results.json"
    results = read_json(store) if store.is_file() else {}
    base = None
    for seed in seeds:
        folder = controller_for(cfg, seed, out)
        controller = load_controller(folder)
        if base is None:
            base = load_base(controller, folder)
        common = dict(model=base.model, tokenizer=base.tokenizer, preprocess_cfg=base.preprocess_cfg,
                      space=controller.space, progress=False)
        runs = {"hipp": dict(methods=[], controller=controller,
                             planners={"hipp": lambda b: plan_for_budget(controller, max_flops=b, base=base)}),
                FIXED: dict(methods=[FIXED], seed=seed,
                             options={FIXED: matched_to(controller.extra["train_config"])})}
        for method, how in runs.items():
            key = f"{method}/{seed}"
            missing = [b for b in budgets if str(b) not in results.get(key, {})]
            if missing:
                got = bench(**common, budgets=missing, **how)
                results[key] = {**results.get(key, {}), **rows_of(got, method)}
                write_json(store, results)
        print(f"seed {seed}: " + ", ".join(f"{m} @{b} {results[f'{m}/{seed}'][str(b)]['utility']:.4f}"
                                           for m in ("hipp", FIXED) for b in budgets), flush=True)
    md = table(results, seeds, budgets)
    write_text(out / "seeds.md", md + "\n")
    print(md)


if __name__ == "__main__":
    main()
