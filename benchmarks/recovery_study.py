"""Recovery after export, measured: for each FLOPs budget, the controller's bound-query plan (and, at
--baselines, training-free baselines' plans) is exported, recovered with `hipp recover`, and
measured on the test sets before and after. CLIP-style: utility = shape zero-shot mean and
Fashion-MNIST accuracy, grounding = the mean over the hard negatives. LLaVA: utility = the mean of
attribute exact match, POPE F1, caption F1 and Fashion-MNIST accuracy on --n test items per kind
(greedy answers), grounding = POPE adversarial F1. The validation curve of each run (utility against
recovery steps, from its log) is drawn in one figure.

    python benchmarks/recovery_study.py --controller runs/seed-validation/controller-seed0 \
        --budgets 0.3,0.5,0.7 --baselines mope@0.3,ecoflap@0.5 --out runs/recovery \
        [--config configs/recover_tiny.yaml] [--figure docs/figures/recovery.png]
    python benchmarks/recovery_study.py --controller runs/hipp-llava-tiny --config configs/recover_llava.yaml \
        --budgets 0.3,0.5 --baselines "" --n 100 --out runs/recovery-llava

Each (plan, budget) is saved in --out as it finishes and reused by a rerun.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hipp import load_model  # noqa: E402
from hipp.config import load_config  # noqa: E402
from hipp.evaluation.evaluate import evaluate  # noqa: E402
from hipp.evaluation.pareto import GROUNDING_KEY, UTILITY_KEYS, utility_difference, utility_of  # noqa: E402
from hipp.recovery import RecoverConfig, recover  # noqa: E402
from hipp.recovery.loop import LOG_NAME  # noqa: E402
from hipp.storage.checkpoint import family, get_processor, get_tokenizer, preprocess_cfg  # noqa: E402
from hipp.storage.fileio import read_json, write_json, write_text  # noqa: E402


def export_plan(controller: str, method: str, budget: float, out: Path) -> None:
    """The controller's bound-query plan (method "hipp") or a baseline's, exported to `out`."""
    if out.is_dir():
        return
    if method == "hipp":
        from hipp.cli.main import main
        if main(["export", "--controller", controller, "--max-flops", str(budget), "--out", str(out)]):
            raise SystemExit(f"export of the controller's plan at {budget} failed")
        return
    from hipp.baselines import make_calibration, make_plan
    from hipp.controller.files import load_controller
    from hipp.export.pruned import export_pruned
    from hipp.query.bound import load_base

    ctrl = load_controller(controller)
    base = load_base(ctrl, controller)
    calibration = make_calibration(base.model, base.tokenizer, base.preprocess_cfg)
    plan = make_plan(method, base.model, ctrl.space, budget, calibration)
    export_pruned(base, plan, out)


def test_metrics(folder: Path, n: int) -> dict:
    """Test metrics of an export; a CLIP-style one's per-item scores are saved beside it (for paired
    standard errors between two exports measured on the same items)."""
    model = load_model(folder)
    if family(model) == "llava":
        from hipp.evaluation.generative import evaluate_generative
        m = evaluate_generative(model, get_processor(folder), split="test", n=n, latency=False)["metrics"]
        return {"utility": utility_of(m), "grounding": m["pope/adversarial_f1"], "attr": m["attr/mean"],
                **{f"pope_{s}": m[f"pope/{s}_f1"] for s in ("random", "popular")}}
    items: dict = {}
    m = evaluate(model, get_tokenizer(folder), preprocess_cfg(model), items=items)
    save_file({k: v.float().contiguous() for k, v in items.items()}, str(items_path(folder)))
    return {"utility": utility_of(m, UTILITY_KEYS), "grounding": m["shapes/ground_mean"],
            "zs_mean": m["shapes/zs_mean"], "fmnist": m["fmnist/acc"]}


def items_path(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.items.safetensors"


def paired(a: Path, b: Path, n: int) -> dict | None:
    """a minus b on utility and grounding, each with the standard error of the paired difference;
    None for LLaVA exports (their answers are not kept per item here)."""
    for folder in (a, b):
        if not items_path(folder).is_file() and family(load_model(folder)) != "llava":
            test_metrics(folder, n)  # a study run before per-item scores were kept
    if not (items_path(a).is_file() and items_path(b).is_file()):
        return None
    ia, ib = load_file(str(items_path(a))), load_file(str(items_path(b)))
    return {"utility": utility_difference(ia, ib, UTILITY_KEYS), "grounding": utility_difference(ia, ib, (GROUNDING_KEY,))}


def _pm(d) -> str:
    return "n/a" if d is None else f"{d[0]:+.4f} ± {d[1]:.4f}"


def run_one(args, cfg: RecoverConfig, method: str, budget: float, out: Path) -> dict:
    done = out / f"{method}-{budget}.json"
    if done.is_file():
        return read_json(done)
    exported, recovered = out / f"{method}-{budget}-export", out / f"{method}-{budget}-recovered"
    export_plan(args.controller, method, budget, exported)
    before = test_metrics(exported, args.n)
    t = time.time()
    info = recover(exported, cfg, recovered, resume=(recovered / "train_state.safetensors").is_file())
    seconds = time.time() - t
    after = test_metrics(recovered, args.n)
    curve = [(r["step"], r["val_utility"], r.get("val_grounding"))
             for r in map(json.loads, (recovered / LOG_NAME).read_text().splitlines()) if "val_utility" in r]
    row = {"method": method, "budget": budget, "test_before": before, "test_after": after, "seconds": seconds,
           "best_step": info["best_step"], "steps_run": info["steps_run"], "val_curve": curve}
    write_json(done, row)
    return row


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_u, ax_g) = plt.subplots(1, 2, figsize=(10, 4.2))
    for r in rows:
        steps, util, ground = zip(*r["val_curve"])
        line, = ax_u.plot(steps, util, marker="o", ms=3, label=f"{r['method']} @{r['budget']}")
        if None not in ground:
            ax_g.plot(steps, ground, marker="o", ms=3, color=line.get_color())
            ax_g.axhline(ground[0], color=line.get_color(), lw=0.8, ls=":")  # the floor keep_grounding holds
        ax_u.axvline(r["best_step"], color=line.get_color(), lw=0.8, ls="--")
    for ax, name in ((ax_u, "validation utility"), (ax_g, "validation grounding (dotted: the export's own)")):
        ax.set_xlabel("recovery steps")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax_u.set_title("Recovery of exported plans (dashed: the kept step)")
    ax_u.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--controller", required=True)
    ap.add_argument("--budgets", default="0.3,0.5,0.7")
    ap.add_argument("--baselines", default="mope@0.3",
                    help="training-free plans also recovered, METHOD@BUDGET,... (empty: none)")
    ap.add_argument("--config", default="configs/recover_tiny.yaml")
    ap.add_argument("--out", default="runs/recovery")
    ap.add_argument("--seed", type=int, help="the recovery seed (default: the config's)")
    ap.add_argument("--n", type=int, default=100, help="LLaVA: test items per kind")
    ap.add_argument("--figure", help="also draw the validation curves here (PNG)")
    args = ap.parse_args()
    cfg = load_config(RecoverConfig, args.config)
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [("hipp", float(b)) for b in args.budgets.split(",")]
    todo += [(m, float(b)) for m, b in (x.split("@") for x in args.baselines.split(",") if x.strip())]
    rows = [run_one(args, cfg, m, b, out) for m, b in todo]
    lines = ["| plan | budget | test utility before | after | change ± paired SE | grounding before | after | "
             "change ± paired SE | best step | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b, name = r["test_before"], r["test_after"], f"{r['method']}-{r['budget']}"
        d = paired(out / f"{name}-recovered", out / f"{name}-export", args.n)
        lines.append(f"| {r['method']} | {r['budget']} | {a['utility']:.4f} | {b['utility']:.4f} | "
                     f"{_pm(d and d['utility'])} | {a['grounding']:.4f} | {b['grounding']:.4f} | "
                     f"{_pm(d and d['grounding'])} | {r['best_step']} of {r['steps_run']} | {r['seconds']:.0f} |")
    versus = [(r, h) for r in rows if r["method"] != "hipp"
              for h in rows if h["method"] == "hipp" and h["budget"] == r["budget"]]
    if versus:
        lines += ["", "| after recovery | budget | utility: hipp minus it ± paired SE | grounding: hipp minus it |",
                  "|---|---|---|---|"]
    for r, h in versus:
        d = paired(out / f"hipp-{h['budget']}-recovered", out / f"{r['method']}-{r['budget']}-recovered", args.n)
        lines.append(f"| {r['method']} | {r['budget']} | {_pm(d and d['utility'])} | {_pm(d and d['grounding'])} |")
    write_text(out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.figure:
        figure(rows, Path(args.figure))
    return 0


if __name__ == "__main__":
    sys.exit(main())
