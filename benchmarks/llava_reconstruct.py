"""What least-squares reconstruction of the kept output projections buys a LLaVA plan, no training.

For each FLOPs budget the controller's bound query (`hipp query --max-flops B`, ranked by answers) is
materialised, answered as is, then reconstructed (hipp/export/reconstruct.py: every kept o_proj /
down_proj / out_proj / fc2 refitted in closed form to the dense branch outputs on `--calib` training
instructions) and answered again on the same items; prints utility and POPE F1 of both and the
difference with its paired bootstrap standard error.

    python benchmarks/llava_reconstruct.py --controller runs/pt-ctrl-x3 --budgets 0.5 --split val --n 200 \
        --out runs/reconstruct-s0
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hipp.controller.files import load_controller  # noqa: E402
from hipp.evaluation.generative import answer_all  # noqa: E402
from hipp.evaluation.generative_bench import JUDGED, Answers, judged  # noqa: E402
from hipp.export.reconstruct import DAMP, calibration_batches, refit  # noqa: E402
from hipp.export.slicing import materialize  # noqa: E402
from hipp.query.bound import load_base, plan_for_budget  # noqa: E402
from hipp.storage.fileio import write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--controller", required=True)
    ap.add_argument("--budgets", default="0.5")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--calib", type=int, default=256, help="training instructions to fit on")
    ap.add_argument("--damp", default=str(DAMP), help="ridge strength(s), comma-separated")
    ap.add_argument("--dense", action="store_true", help="also answer with the dense model")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    controller = load_controller(args.controller)
    base = load_base(controller, args.controller)
    model, processor = base.model.eval(), base.tokenizer
    batches = calibration_batches(processor, args.calib)
    result = {"settings": vars(args), "rows": []}
    if args.dense:
        dense = Answers(*answer_all(model, processor, args.split, args.n))
        result["dense"] = judged(dense.metrics)
        print("dense", {k: round(v, 4) for k, v in result["dense"].items()}, flush=True)
    for budget in (float(b) for b in args.budgets.split(",")):
        plan = plan_for_budget(controller, max_flops=budget, base=base)
        small = materialize(model, plan).eval()
        before = Answers(*answer_all(small, processor, args.split, args.n))
        resamples = before.resamples()
        row = {"budget": budget, "flops_ratio": plan.costs()["flops_ratio"], "plain": judged(before.metrics)}
        print(f"@{budget} plain", {k: round(v, 4) for k, v in row["plain"].items()}, flush=True)
        for damp in (float(d) for d in args.damp.split(",")):
            fitted = materialize(model, plan).eval()
            start = time.perf_counter()
            info = refit(model, fitted, batches, damp=damp)
            seconds = time.perf_counter() - start
            after = Answers(*answer_all(fitted, processor, args.split, args.n))
            se = after.paired_se(before, resamples)
            got = judged(after.metrics)
            row[f"damp={damp}"] = {**got, "seconds": seconds, **info,
                                   "diff": {k: got[k] - row["plain"][k] for k in JUDGED}, "se": se}
            print(f"@{budget} damp {damp} ({seconds:.0f} s)", "  ".join(
                f"{k} {got[k]:.4f} ({got[k] - row['plain'][k]:+.4f} ± {se[k]:.4f})" for k in JUDGED), flush=True)
        result["rows"].append(row)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out) / "result.json", result)


if __name__ == "__main__":
    main()
