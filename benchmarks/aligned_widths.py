"""What an MLP width costs off a multiple of 8: the embedded teacher materialised with every layer and
head kept and each layer's MLP cut to C channels, timed per tower for C on either side of multiples
of 8, in rounds interleaved so drift in machine speed cancels (docs/studies/latency.md).

    python benchmarks/aligned_widths.py --model checkpoints/teacher-tiny --widths 216,219,288,293,296,511,512
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hipp.backends import make_prunable  # noqa: E402
from hipp.evaluation.profile import Timer, grid_plan, measures_for  # noqa: E402
from hipp.export.slicing import materialize  # noqa: E402
from hipp.storage.checkpoint import load_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="checkpoints/teacher-tiny")
    p.add_argument("--widths", default="216,219,288,293,296,511,512")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    space = make_prunable(model, 1)
    widths = [int(w) for w in args.widths.split(",")]
    heads = max(l.num_heads for l in space.layers)
    every = list(range(len(space.layers)))
    models = [materialize(model, grid_plan(space, every, heads, w)).eval() for w in widths]
    timer = Timer(measures_for(model, space, args.batch, torch.device("cpu")), torch.device("cpu"), args.repeats, 2)
    print(f"{args.model}: every layer and head kept, MLP width C per layer; median ms per batch of {args.batch}, "
          f"{torch.get_num_threads()} threads")
    for name in timer.measures:
        ms = timer.times(models, name)
        print(f"  {name}: " + ", ".join(f"C={w} {t:.2f} ms" for w, t in zip(widths, ms)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
