"""What least-squares reconstruction of the kept output projections buys a plan, with no training.

For each FLOPs budget the controller's bound query (`hipp query --max-flops B`; `--method M`: a
training-free method's plan, as `hipp bench` makes it) is materialised, measured as is, then refitted
(hipp/export/reconstruct.py, as `hipp export --reconstruct N` does: every kept output projection fitted
in closed form to the dense branch outputs on `--calib` training instructions, or training scenes and
Fashion-MNIST images for a CLIP model) and measured again on the same items. Prints utility (and a
LLaVA's POPE F1) of both, and the change with its paired standard error (a LLaVA: paired bootstrap
over the answers; CLIP: per-item scores of the zero-shot metrics, hipp.evaluation.pareto).

    python benchmarks/reconstruct.py --controller runs/pt-ctrl-x3 --budgets 0.5 --split val --n 200 \
        --out runs/reconstruct-s0
    python benchmarks/reconstruct.py --controller runs/seed-validation/controller-seed0 --budgets 0.3,0.5,0.7 \
        --split val --out runs/reconstruct-clip-s0
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hipp.baselines import METHODS  # noqa: E402
from hipp.baselines.calibration import make_calibration  # noqa: E402
from hipp.controller.files import load_controller  # noqa: E402
from hipp.evaluation.generative import answer_all  # noqa: E402
from hipp.evaluation.generative_bench import JUDGED, Answers, judged  # noqa: E402
from hipp.evaluation.pareto import evaluate_plan, utility_difference  # noqa: E402
from hipp.export.reconstruct import DAMP, calibration_batches, contrastive_batches, refit  # noqa: E402
from hipp.export.slicing import materialize  # noqa: E402
from hipp.query.bound import load_base, plan_for_budget  # noqa: E402
from hipp.storage.checkpoint import family  # noqa: E402
from hipp.storage.fileio import write_json  # noqa: E402


class Generative:
    """A LLaVA: greedy answers to n items of each kind; utility and POPE F1; paired bootstrap errors."""
    keys = JUDGED

    def __init__(self, base, split, n):
        self.base, self.split, self.n = base, split, n

    def measure(self, plan, small):
        answers = Answers(*answer_all(small, self.base.tokenizer, self.split, self.n))
        return judged(answers.metrics), answers

    def se(self, after, before):
        return after.paired_se(before, before.resamples())


class Contrastive:
    """A CLIP model: shape zero-shot and Fashion-MNIST (whole split); utility's paired SE from per-item scores."""
    keys = ("utility", "grounding")

    def __init__(self, base, split, n):
        self.base, self.split, self.n = base, split, n

    def measure(self, plan, small):
        r = evaluate_plan(self.base.model, plan, self.base.tokenizer, self.base.preprocess_cfg, n=self.n,
                          fmnist_limit=None, items=True, split=self.split, small=small)
        return {k: r[k] for k in self.keys}, r["items"]

    def se(self, after, before):
        return {"utility": utility_difference(after, before)[1], "grounding": float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--controller", required=True)
    ap.add_argument("--budgets", default="0.5")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--n", type=int, help="items of each kind (default: a LLaVA 200, CLIP 1000 scenes)")
    ap.add_argument("--calib", type=int, default=256, help="training instructions (CLIP: scenes and images) to fit on")
    ap.add_argument("--damp", default=str(DAMP), help="ridge strength(s), comma-separated")
    ap.add_argument("--dense", action="store_true", help="also answer with the dense model")
    ap.add_argument("--method", default="hipp", help="hipp (the bound query) or a training-free method of hipp bench")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    controller = load_controller(args.controller)
    base = load_base(controller, args.controller)
    model, processor = base.model.eval(), base.tokenizer
    generative = family(model) == "llava"
    n = args.n or (200 if generative else 1000)
    judge = (Generative if generative else Contrastive)(base, args.split, n)
    batches = calibration_batches(processor, args.calib) if generative else contrastive_batches(base, args.calib)
    if args.method == "hipp":
        planner = lambda b: plan_for_budget(controller, max_flops=b, base=base)  # noqa: E731
    else:  # the bench's plan for that method, from its own calibration (seed 0, as hipp bench)
        pp = getattr(model, "preprocess_cfg", {}) if generative else base.preprocess_cfg  # as each bench passes it
        calibration = make_calibration(model, processor, pp)
        planner = lambda b: METHODS[args.method](model, controller.space, b, calibration, 0, {}, None)  # noqa: E731
    result = {"settings": vars(args), "rows": []}
    if args.dense:
        if not generative:
            sys.exit("--dense: use hipp eval --split for a CLIP model")
        dense = Answers(*answer_all(model, processor, args.split, n))
        result["dense"] = judged(dense.metrics)
        print("dense", {k: round(v, 4) for k, v in result["dense"].items()}, flush=True)
    for budget in (float(b) for b in args.budgets.split(",")):
        plan = planner(budget)
        plain, before = judge.measure(plan, materialize(model, plan).eval())
        row = {"budget": budget, "flops_ratio": plan.costs()["flops_ratio"], "plain": plain}
        print(f"@{budget} plain", {k: round(v, 4) for k, v in row["plain"].items()}, flush=True)
        for damp in (float(d) for d in args.damp.split(",")):
            fitted = materialize(model, plan).eval()
            start = time.perf_counter()
            info = refit(model, fitted, batches, damp=damp)
            seconds = time.perf_counter() - start
            got, after = judge.measure(plan, fitted)
            se = judge.se(after, before)
            row[f"damp={damp}"] = {**got, "seconds": seconds, **info,
                                   "diff": {k: got[k] - plain[k] for k in judge.keys}, "se": se}
            print(f"@{budget} damp {damp} ({seconds:.0f} s)", "  ".join(
                f"{k} {got[k]:.4f} ({got[k] - plain[k]:+.4f} ± {se[k]:.4f})" for k in judge.keys), flush=True)
        result["rows"].append(row)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out) / "result.json", result)


if __name__ == "__main__":
    main()
