"""Ask a LLaVA model folder (the teacher or an export) a few test questions and print its greedy answers.

    python examples/ask.py --model runs/demo-llava/pruned-50 --n 4
"""
from __future__ import annotations

import argparse
import sys

from hipp import load_model
from hipp.data.instruct import make_samples
from hipp.data.words import prompt
from hipp.evaluation.generative import CAPTION_TOKENS, generate
from hipp.storage.checkpoint import get_processor


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=4, help="test samples, every kind in turn")
    args = ap.parse_args()
    model, processor = load_model(args.model), get_processor(args.model)
    for s in make_samples("test", args.n, seed=0, image_size=int(model.config.vision_config.image_size)):
        answer = generate(model, processor, [s.image], [prompt(s.question)], CAPTION_TOKENS)[0]
        print(f"{s.question!r} -> {answer!r} (expected {s.answer!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
