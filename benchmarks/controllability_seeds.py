"""`llava_controllability.py` over several controller seeds: each weight's POPE adversarial F1 and
utility as mean ± sd over the runs, each step between neighbouring weights (mean ± sd of the per-run
steps, so a step that is smaller than its spread is a coin flip for one run's ordering), the Spearman
of every run and of the mean curve.

    python benchmarks/controllability_seeds.py runs/ctl5-s0 runs/ctl5-s1 runs/ctl5-s2
"""
import argparse
import statistics
import sys

from bench_seeds import read_runs, spread
from hipp.evaluation.front import spearman

F1 = "pope/adversarial_f1"


def signed(steps: list[float]) -> str:
    mean = statistics.mean(steps)
    return f"{0.0 if abs(mean) < 5e-4 else mean:+.3f} ± {statistics.stdev(steps) if len(steps) > 1 else 0.0:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="output folders of llava_controllability.py (result.json)")
    args = ap.parse_args()
    runs = read_runs(args.runs, "result.json", "benchmarks/llava_controllability.py --out")
    if runs is None:
        return 2
    weights = [r["grounding_weight"] for r in runs[0]["rows"]]
    if any([r["grounding_weight"] for r in run["rows"]] != weights for run in runs):
        print("controllability_seeds: the runs measured different weights", file=sys.stderr)
        return 2
    setting = ("split", "n", "probes", "budget", "match", "polish_steps", "polish_split")
    value = lambda run, k: run.get(k, run["n"]) if k == "probes" else run.get(k)  # noqa: E731  (older runs: n)
    differ = [k for k in setting if any(value(run, k) != value(runs[0], k) for run in runs)]
    if differ:
        print(f"controllability_seeds: the runs differ in their settings ({', '.join(differ)})", file=sys.stderr)
        return 2
    f1 = [[r[F1] for r in run["rows"]] for run in runs]
    print(f"{len(runs)} runs ({runs[0]['split']}, {runs[0]['n']} per kind, {value(runs[0], 'probes')} adversarial probes, "
          f"FLOPs {runs[0]['budget']})\n")
    print("| grounding weight | adversarial F1 | utility | step from the previous weight |")
    print("|---|---|---|---|")
    for i, w in enumerate(weights):
        step = signed([f[i] - f[i - 1] for f in f1]) if i else "-"
        utility = spread([run["rows"][i]["utility"] for run in runs])
        print(f"| {w:g} | {spread([f[i] for f in f1])} | {utility} | {step} |")
    each = [spearman(weights, f) for f in f1]
    mean_curve = [statistics.mean(f[i] for f in f1) for i in range(len(weights))]
    print(f"\nSpearman(weight, adversarial F1) per run: {' / '.join(f'{r:.2f}' for r in each)} "
          f"(mean {spread(each)}); of the mean curve: {spearman(weights, mean_curve):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
