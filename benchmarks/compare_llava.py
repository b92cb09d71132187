"""LLaVA folders side by side on one split: the teacher's recipe is chosen on validation, so this
measures candidates there (and, for POPE, splits each sampling's errors into probes about colour-shape
pairs seen in training and the held-out ones, which no training scene or question contains).

    python benchmarks/compare_llava.py --models checkpoints/llava-tiny,runs/other/llava-tiny --split val --n 500
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hipp.data.shapes import HELD_OUT_PAIRS  # noqa: E402
from hipp.evaluation.answers import first_word, score  # noqa: E402
from hipp.evaluation.generative import answer_all  # noqa: E402
from hipp.storage.checkpoint import get_processor, load_model  # noqa: E402

SHOWN = ("pope/random_f1", "pope/popular_f1", "pope/adversarial_f1", "attr/mean", "attr/color", "attr/shape",
         "attr/size", "attr/position", "attr/count", "caption/recall", "fmnist/acc")
POPE = ("pope/random", "pope/popular", "pope/adversarial")


def held_out_errors(samples, predictions) -> dict[str, str]:
    """Per POPE sampling: wrong / asked, for seen and for held-out pairs."""
    out = {}
    for kind in POPE:
        counts = {"seen": [0, 0], "held-out": [0, 0]}
        for s, p in zip(samples, predictions):
            if s.kind == kind:
                c = counts["held-out" if tuple(s.meta["pair"]) in HELD_OUT_PAIRS else "seen"]
                c[0] += first_word(p) != s.answer  # read as score() reads a POPE answer
                c[1] += 1
        out[kind] = ", ".join(f"{k} {w}/{n}" for k, (w, n) in counts.items())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True, help="comma-separated LLaVA folders")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--n", type=int, default=500, help="samples of each kind")
    args = ap.parse_args(argv)
    paths = args.models.split(",")
    rows = {}
    for path in paths:
        samples, predictions = answer_all(load_model(path), get_processor(path), args.split, args.n)
        rows[path] = (score(samples, predictions), held_out_errors(samples, predictions))
    print(f"{args.split}, {args.n} per kind")
    print("| metric | " + " | ".join(paths) + " |")
    print("|---|" + "---|" * len(paths))
    for k in SHOWN:
        print(f"| {k} | " + " | ".join(f"{rows[p][0][k]:.4f}" for p in paths) + " |")
    for kind in POPE:
        print(f"| {kind} wrong | " + " | ".join(rows[p][1][kind] for p in paths) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
