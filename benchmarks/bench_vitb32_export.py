"""A bound export at real size: `hipp export --max-flops 0.5` of a random-init open_clip ViT-B-32,
through the plain CLI, timed as a whole process (load, search, ranking, slicing, writing).

    python benchmarks/bench_vitb32_export.py [--out runs/vitb32] [--candidates N --calib-images N]

The controller it exports from is trained for one step only (`hipp train --max-steps 1` on a
config naming ViT-B-32 with no pretrained weights): the search and ranking do the same work for any
controller weights, and training is not what is timed.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CONFIG = """model: ViT-B-32
pretrained: null
family: open_clip
output: {out}/controller
channel_group: 64
seed: 0
steps: 600
save_every: 1
data: {{batch_size: 8, shape_fraction: 0.5, negatives: 2}}
objectives: {{names: [utility, grounding, flops, params]}}
"""


def hipp(*args) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hipp", *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"hipp {' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return time.perf_counter() - t, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/vitb32")
    ap.add_argument("--candidates", type=int)
    ap.add_argument("--calib-images", type=int)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "controller.yaml"
    config.write_text(CONFIG.format(out=out))
    if not (out / "controller" / "controller.json").is_file():
        train_s, _ = hipp("train", "--config", config, "--max-steps", 1, "--overwrite")
        print(f"controller (1 step) trained in {train_s:.0f} s", file=sys.stderr)
    extra = [a for k, v in (("--candidates", args.candidates), ("--calib-images", args.calib_images)) if v
             for a in (k, v)]
    seconds, stdout = hipp("export", "--controller", out / "controller", "--max-flops", 0.5,
                           "--out", out / "export-0.5", "--overwrite", "--json", *extra)
    result = json.loads(stdout)
    search = result["meta"]["search"]
    print(json.dumps({"export_seconds": round(seconds, 1), "flops_ratio": round(result["flops_ratio"], 4),
                      "params_ratio": round(result["params_ratio"], 4), "num_params": result["num_params"],
                      "candidates_ranked": search["candidates_ranked"],
                      "calibration_images": search["calibration_images"], "ranked_by": search["ranked_by"]},
                     indent=1))


if __name__ == "__main__":
    main()
