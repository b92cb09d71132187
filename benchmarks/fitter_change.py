"""What moving the baselines onto the project's one budget fitter changed: every training-free
baseline's plan at each budget under the code of two checkouts, measured by today's evaluation on
the test sets, with the paired standard error of each difference.

    git worktree add /tmp/hipp-old <commit before the change>
    python benchmarks/fitter_change.py plans --code /tmp/hipp-old --out runs/fitter-change/old [--methods uniform,...]
    python benchmarks/fitter_change.py plans --code . --out runs/fitter-change/new
    python benchmarks/fitter_change.py compare --old runs/fitter-change/old --new runs/fitter-change/new

`plans` imports hipp from --code, so each checkout plans with its own allocator; `compare` evaluates
with the current code. A plan both checkouts agree on is not measured twice (its difference is 0).
"""
import argparse
import json
import sys
from pathlib import Path

BUDGETS = (0.3, 0.5, 0.7)
METHODS = ("uniform", "random", "magnitude", "flap", "multiflow", "ecoflap", "mope")
TEACHER = "checkpoints/teacher-tiny"
CHANNEL_GROUP = 8  # the embedded recipe's (configs/hipp_tiny.yaml): the space the bench plans its baselines on


def plans(code: str, out: Path, methods=METHODS) -> None:
    sys.path.insert(0, str(Path(code).resolve()))
    from hipp import baselines as B
    from hipp.backends import make_prunable
    from hipp.storage.checkpoint import get_tokenizer, load_model, preprocess_cfg

    print("hipp from", Path(sys.modules["hipp"].__file__).parent, flush=True)
    model = load_model(TEACHER)
    space = make_prunable(model, CHANNEL_GROUP)
    calibration = B.make_calibration(model, get_tokenizer(TEACHER), preprocess_cfg(model))
    out.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    for method in methods:
        for budget in BUDGETS:
            for seed in range(B.METHODS[method].seeds):
                plan = B.make_plan(method, model, space, budget, calibration, seed=seed, cache=cache)
                (out / f"{method}-{budget}-{seed}.json").write_text(json.dumps(plan.to_dict()))
                print(method, budget, seed, round(plan.costs()["flops_ratio"], 4), flush=True)


def compare(old: Path, new: Path) -> None:
    from hipp import baselines as B
    from hipp.backends import make_prunable
    from hipp.core.plan import Plan
    from hipp.evaluation.pareto import evaluate_plan, utility_difference
    from hipp.storage.checkpoint import get_tokenizer, load_model, preprocess_cfg

    model = load_model(TEACHER)
    make_prunable(model, CHANNEL_GROUP)
    tokenizer, pp = get_tokenizer(TEACHER), preprocess_cfg(model)
    calibration = B.make_calibration(model, tokenizer, pp)
    print("| method | budget | seed | FLOPs old / new | utility old | utility new | new - old |")
    print("|---|---|---|---|---|---|---|")
    for path in sorted(old.glob("*.json")):
        if not (new / path.name).is_file():
            continue
        a, b = (Plan.from_dict(json.loads(p.read_text())) for p in (path, new / path.name))
        method, budget, seed = path.stem.split("-")
        flops = f"{a.costs()['flops_ratio']:.4f} / {b.costs()['flops_ratio']:.4f}"
        if a == b:
            print(f"| {method} | {budget} | {seed} | {flops} | same plan | | 0 |", flush=True)
            continue
        ra, rb = (evaluate_plan(model, p, tokenizer, pp, n=1000, fmnist_limit=None, calibration=calibration,
                                items=True) for p in (a, b))
        d, se = utility_difference(rb["items"], ra["items"])
        print(f"| {method} | {budget} | {seed} | {flops} | {ra['utility']:.4f} | {rb['utility']:.4f} | "
              f"{d:+.4f} ± {se:.4f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plans")
    p.add_argument("--code", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated; MoPE-style takes over an hour on one core under the old fitter")
    c = sub.add_parser("compare")
    c.add_argument("--old", required=True)
    c.add_argument("--new", required=True)
    args = ap.parse_args()
    if args.cmd == "plans":
        plans(args.code, Path(args.out), [m.strip() for m in args.methods.split(",")])
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        compare(Path(args.old), Path(args.new))


if __name__ == "__main__":
    main()
