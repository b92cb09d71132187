"""`hipp bench` over several controller seeds: each method's utility and POPE adversarial F1 per budget
and its hypervolume as mean ± sd over the runs, the controller's share of the teacher's utility and of
each POPE F1 per budget, then, for every run, the bench's claims checked on
that run's own paired margins (the controller above every training-free method by more than two
paired standard errors, or not below it by more than two).

    python benchmarks/bench_seeds.py runs/bench-s0 runs/bench-s1 runs/bench-s2 [--strict 0.3,0.5]

Budgets in --strict must be won by more than two SE; the others only not lost by more than two.
A CLIP bench (no POPE; its margins are over the best training-free method only): each method's utility
per budget, mean ± sd, then per run the controller's margin over the best training-free method.
"""
import argparse
import statistics
import sys
from pathlib import Path

from hipp.evaluation.bench import CONTROLLER
from hipp.storage.fileio import read_json

METRICS = ("utility", "pope/random_f1", "pope/popular_f1", "pope/adversarial_f1")


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def table(runs: list[dict]) -> list[str]:
    budgets = runs[0]["budgets"]
    methods = [m for m in runs[0]["hypervolume"] if all(m in r["hypervolume"] for r in runs)]
    lines = [f"| method | utility @{' / '.join(map(str, budgets))} | POPE adversarial F1 | hypervolume |",
             "|---|---|---|---|"]
    for m in sorted(methods, key=lambda m: -statistics.mean(r["hypervolume"][m] for r in runs)):
        cell = {k: [] for k in ("utility", "pope/adversarial_f1")}
        for b in budgets:
            rows = [next(x for x in r["results"] if x["method"] == m and x["budget"] == b) for r in runs]
            for k in cell:
                cell[k].append(spread([x[k] for x in rows]))
        lines.append(f"| {m} | {' / '.join(cell['utility'])} | {' / '.join(cell['pope/adversarial_f1'])} | "
                     f"{spread([r['hypervolume'][m] for r in runs])} |")
    return lines


def shares(runs: list[dict]) -> list[str]:
    """The controller's share of the dense teacher's utility and of each POPE F1, per budget, mean ± sd."""
    lines = [f"| FLOPs | {' | '.join(f'{k} of the teacher' for k in METRICS)} |", "|---|" + "---|" * len(METRICS)]
    for b in runs[0]["budgets"]:
        rows = [(next(x for x in r["results"] if x["method"] == CONTROLLER and x["budget"] == b), r["dense"]) for r in runs]
        lines.append(f"| {b} | " + " | ".join(spread([x[k] / dense[k] for x, dense in rows]) for k in METRICS) + " |")
    return lines


def trained(run: dict) -> set[str]:
    """The methods that train per budget (the bench marks them in its margins)."""
    return {m for against in run["margins"][CONTROLLER].values() for m, margin in against.items() if margin.get("trains")}


def claims(run: dict, strict: set[str]) -> list[str]:
    """Every (budget, training-free method, metric) where the run's controller misses its claim."""
    misses, skip = [], trained(run)
    for budget, against in run["margins"][CONTROLLER].items():
        for method, margin in against.items():
            for k in METRICS if method not in skip else ():
                z = margin[k]["diff"] / max(margin[k]["se"], 1e-12)
                if (budget in strict and z <= 2) or z < -2:
                    misses.append(f"{budget} {method} {k} {margin[k]['diff']:+.3f} ± {margin[k]['se']:.3f}")
    return misses


def contrastive(folders: list[str], runs: list[dict]) -> int:
    budgets = runs[0]["budgets"]
    methods = [m for m in runs[0]["hypervolume"] if all(m in r["hypervolume"] for r in runs)]
    print(f"| method | utility @{' / '.join(map(str, budgets))} | hypervolume |\n|---|---|---|")
    for m in sorted(methods, key=lambda m: -statistics.mean(r["hypervolume"][m] for r in runs)):
        cells = [spread([next(x["utility"] for x in r["results"] if x["method"] == m and x["budget"] == b)
                         for r in runs]) for b in budgets]
        print(f"| {m} | {' / '.join(cells)} | {spread([r['hypervolume'][m] for r in runs])} |")
    for folder, run in zip(folders, runs):
        over = [f"@{b} {e['over_training_free']:+.3f} ± {e.get('se', {}).get('over_training_free', float('nan')):.3f} "
                f"({e['best_training_free']})" for b, e in run["margins"][CONTROLLER].items()]
        print(f"{folder}: over the best training-free method {'; '.join(over)}")
    return 0


def read_runs(folders: list[str], name: str, made_by: str) -> list[dict] | None:
    """Each folder's `name` (JSON), or None after one line on stderr when one is missing."""
    runs = []
    for folder in folders:
        path = Path(folder) / name
        if not path.is_file():
            print(f"error: {path} not found (run {made_by} {folder} first)", file=sys.stderr)
            return None
        runs.append(read_json(path))
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="hipp bench output folders (bench.json), one per seed")
    ap.add_argument("--strict", default="0.3,0.5", help="budgets the controller must win by > 2 SE")
    args = ap.parse_args()
    runs = read_runs(args.runs, "bench.json", "hipp bench --out")
    if runs is None:
        return 2
    if not any("pope/adversarial_f1" in row for row in runs[0]["results"]):
        return contrastive(args.runs, runs)
    print("\n".join(table(runs) + [""] + shares(runs)))
    strict = {str(float(b)) for b in args.strict.split(",") if b.strip()}
    for folder, run in zip(args.runs, runs):
        misses = claims(run, strict)
        hv = run["hypervolume"]
        best_free = max(v for m, v in hv.items() if m != CONTROLLER and m not in trained(run))
        seconds = run["train_seconds"]
        cost = "".join(f", {seconds[CONTROLLER] / seconds[m]:.2f}x {m}'s (hypervolume {hv[m]:.3f})"
                       for m in sorted(trained(run)))
        print(f"{folder}: train {seconds.get(CONTROLLER, 0):.0f} s{cost}; hypervolume {hv[CONTROLLER]:.3f} "
              f"(best training-free {best_free:.3f}); claims missed: {'; '.join(misses) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
