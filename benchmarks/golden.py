"""Fingerprints of results a refactor must not change: run it before and after, on the same machine.

    python benchmarks/golden.py --out runs/golden-before.json
    ... change the code ...
    python benchmarks/golden.py --out runs/golden-after.json --compare runs/golden-before.json

It trains the embedded recipe (configs/hipp_tiny.yaml) for --steps steps and records, as hashes:
every controller tensor; the hard plan for a grid of preferences; the candidate plans of bound
queries (FLOPs 0.3 / 0.5 / 0.7, params 0.85) and the plan each ranks first; every training-free
baseline at 0.3 / 0.5 / 0.7; the prune space and dense costs of the teacher. The CPU changes
training's random draws (see BENCHMARKS.md), so the two files must come from one machine.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGETS = (0.3, 0.5, 0.7)
BASELINES = ("uniform", "random", "magnitude", "flap", "multiflow", "ecoflap", "mope")


def _hash(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


def measure(steps: int) -> dict:
    import torch

    from hipp.baselines import make_calibration, make_plans
    from hipp.config import load_config
    from hipp.controller.files import load_controller
    from hipp.query.bound import bound_candidates, candidate_preferences, load_base, plan_for_budget
    from hipp.training.trainer import TrainConfig, train

    cfg = load_config(TrainConfig, ROOT / "configs" / "hipp_tiny.yaml")
    cfg.model = str(ROOT / cfg.model)
    out: dict = {"steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        cfg.output = str(Path(tmp) / "controller")
        train(cfg, max_steps=steps)
        controller = load_controller(cfg.output)
        out["controller"] = {k: _hash(v.float().numpy().tobytes()) for k, v in sorted(controller.state_dict().items())}
        base = load_base(controller, cfg.output)
    out["space"] = _hash(json.dumps(controller.space.to_dict(), sort_keys=True).encode())
    out["dense_costs"] = controller.space.dense_costs()
    prefs = candidate_preferences(controller.objective_names, points=6)
    out["plans"] = [_hash(controller.plan(p).mask_key()) for p in prefs]
    bounds = [{"max_flops": b} for b in BUDGETS] + [{"max_params": 0.85}]
    out["bound_candidates"] = {json.dumps(b): [_hash(c.plan.mask_key()) for c in bound_candidates(controller, **b)]
                               for b in bounds}
    out["bound_query"] = {json.dumps(b): _hash(plan_for_budget(controller, base=base, **b).mask_key())
                          for b in bounds[1:2]}
    torch.manual_seed(0)
    calibration = make_calibration(base.model, base.tokenizer, base.preprocess_cfg)
    out["baselines"] = {}
    for method in BASELINES:
        plans = make_plans(method, base.model, controller.space, BUDGETS, calibration, cache={})
        out["baselines"][method] = [_hash(p.mask_key()) for p in plans]
    return out


def compare(now: dict, before: dict) -> list[str]:
    diffs = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(a.keys() | b.keys()):
                walk(a.get(k), b.get(k), f"{path}.{k}")
        elif a != b:
            diffs.append(f"{path}: {b!r} -> {a!r}")
    walk(now, before, "")
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--compare", help="an earlier output of this script: print every difference")
    args = ap.parse_args()
    from hipp.storage.fileio import write_json
    result = measure(args.steps)
    write_json(args.out, result)
    if not args.compare:
        print(f"written {args.out}")
        return 0
    diffs = compare(result, json.loads(Path(args.compare).read_text()))
    print("\n".join(diffs) if diffs else f"identical to {args.compare}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
