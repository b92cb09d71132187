"""Train the embedded LLaVA teacher, then measure the saved fp16 folder and write its model card.

    python train/pretrain_llava.py --config configs/llava_tiny.yaml [--resume] [--steps N] [--output DIR]
    accelerate launch train/pretrain_llava.py --config configs/llava_tiny.yaml   # several processes
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: train/ is not installed

from hipp.cli.main import run_guarded
from hipp.config import load_config
from train.llava_card import write_llava_card
from train.llava_teacher import LlavaTeacherConfig, train_llava_teacher


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--steps", type=int, help="override the config's step count")
    ap.add_argument("--output", help="override the config's output folder")
    args = ap.parse_args(argv)
    cfg = load_config(LlavaTeacherConfig, args.config)
    if args.steps:
        cfg.steps = args.steps
    if args.output:
        cfg.output = args.output
    info = train_llava_teacher(cfg, resume=args.resume)
    metrics = write_llava_card(cfg, args.config, info["train_seconds"])
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
