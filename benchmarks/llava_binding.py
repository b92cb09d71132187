"""Where a LLaVA teacher's attribute answers go wrong: in scenes of two or three objects, questions that
name the object by where it is ("What color is the object at the top-left?", position-keyed) against
questions that name it by what it looks like ("Where is the red circle?", content-keyed); how often a
wrong answer is another object's attribute; and, per decoder layer, the attention the last prompt token
pays to the named object's patches against the other objects' (the head that separates them most);
and how well a linear probe reads colour, shape and cell from the vision features at an object's patch.

    python benchmarks/llava_binding.py --models checkpoints/llava-tiny,runs/other/llava-tiny --split val --n 300
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hipp.data import shapes, words  # noqa: E402
from hipp.data.instruct import eval_sets, position_word  # noqa: E402
from hipp.data.shapes import object_patches  # noqa: E402
from hipp.evaluation.answers import first_word  # noqa: E402
from hipp.evaluation.generative import answer_all  # noqa: E402
from hipp.storage.checkpoint import get_processor, load_model  # noqa: E402

KINDS = ("attr/color", "attr/shape", "attr/position")


def value(obj: shapes.Obj, attr: str) -> str:
    return position_word(obj.position) if attr == "position" else getattr(obj, attr)


def keying(sample) -> str:
    return "position-keyed" if "position" in sample.meta["ref"] else "content-keyed"


def tally(samples, predictions) -> Counter:
    """(kind, keying, outcome) counts over multi-object scenes; outcome is right, another object's
    value, or a value no object in the scene has."""
    out = Counter()
    for s, p in zip(samples, predictions):
        objs = s.meta["objects"]
        if len(objs) < 2:
            continue
        attr, word = s.kind.split("/")[1], first_word(p)
        others = {value(o, attr) for o in objs if o != s.meta["target"]}
        outcome = "right" if word == s.answer else "other object" if word in others else "absent value"
        out[(s.kind, keying(s), outcome)] += 1
    return out


@torch.no_grad()
def attention_to_target(model, processor, samples) -> list[tuple[float, float]]:
    """Per decoder layer, for the head that separates them most: the last prompt token's attention summed
    over the named object's patches, and summed over the other objects' patches per other object,
    each averaged over the samples."""
    model.set_attn_implementation("eager")
    batch = words.encode_prompts(processor, [s.image for s in samples], [words.prompt(s.question) for s in samples])
    attentions = model(**batch, output_attentions=True).attentions
    side, patch = words.image_side(processor), processor.patch_size
    sums = torch.zeros(len(attentions), attentions[0].shape[1], 2)
    for i, s in enumerate(samples):
        image_pos = (batch["input_ids"][i] == model.config.image_token_id).nonzero().flatten()
        target = image_pos[object_patches(s.meta["target"], side, patch)]
        others = image_pos[[p for o in s.meta["objects"] if o != s.meta["target"]
                            for p in object_patches(o, side, patch)]]
        for layer, a in enumerate(attentions):
            sums[layer, :, 0] += a[i, :, -1, target].sum(-1)
            sums[layer, :, 1] += a[i, :, -1, others].sum(-1) / (len(s.meta["objects"]) - 1)
    sums /= len(samples)
    best = (sums[..., 0] - sums[..., 1]).argmax(1)
    return [(float(sums[layer, h, 0]), float(sums[layer, h, 1])) for layer, h in enumerate(best.tolist())]


def _probe_accuracy(x: torch.Tensor, y: torch.Tensor, classes: int, train: int) -> float:
    """A linear classifier fitted on the first `train` rows (standardised), scored on the rest."""
    mean, std = x[:train].mean(0), x[:train].std(0) + 1e-5
    x = ((x - mean) / std).detach()
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-4)
    with torch.enable_grad():  # the features come from a no-grad pass
        for _ in range(300):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin(x[:train]), y[:train]).backward()
            opt.step()
    with torch.no_grad():
        return float((lin(x[train:]).argmax(1) == y[train:]).float().mean())


@torch.no_grad()
def vision_probe(model, processor, split: str, scenes: int) -> list[tuple[float, float, float]]:
    """Per vision-tower layer (0: the embeddings): how well a linear probe reads an object's colour,
    shape and grid cell from the one patch at its cell's centre, fitted on 3/4 of the objects of
    `scenes` scenes and scored on the rest. High colour here and chance content-keyed answers above
    mean the image features hold what the decoder fails to look up."""
    side, patch = words.image_side(processor), processor.patch_size
    objs = [shapes.sample_scene(0, split, i) for i in range(scenes)]
    images = [shapes.render(o, side, np.random.default_rng(i)) for i, o in enumerate(objs)]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    states = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    index, labels = [], []
    for i, scene in enumerate(objs):
        for o in scene:
            cell = shapes.POSITIONS.index(o.position)
            row, col = divmod(cell, 3)
            centre = int((row + 0.5) * side / 3 // patch) * (side // patch) + int((col + 0.5) * side / 3 // patch)
            index.append((i, 1 + centre))  # 1 +: the class token comes first
            labels.append((list(shapes.COLORS).index(o.color), shapes.SHAPES.index(o.shape), cell))
    index, labels = torch.tensor(index), torch.tensor(labels)
    train = int(0.75 * len(index))
    sizes = (len(shapes.COLORS), len(shapes.SHAPES), len(shapes.POSITIONS))
    return [tuple(_probe_accuracy(h[index[:, 0], index[:, 1]], labels[:, k], sizes[k], train) for k in range(3))
            for h in states]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True, help="comma-separated LLaVA folders")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--n", type=int, default=300, help="questions of each attribute kind")
    ap.add_argument("--attention", type=int, default=120, help="content-keyed position questions for the attention")
    ap.add_argument("--probe-scenes", type=int, default=2400, help="scenes for the vision-feature probe (0: skip it)")
    args = ap.parse_args(argv)
    for path in args.models.split(","):
        model, processor = load_model(path).eval(), get_processor(path)
        samples, predictions = answer_all(model, processor, args.split, args.n, kinds=KINDS)
        counts = tally(samples, predictions)
        print(f"{path} ({args.split}, {args.n} questions per kind, scenes of 2-3 objects)")
        print("| question | keyed by | right | another object's | absent value |")
        print("|---|---|---|---|---|")
        for kind in KINDS:
            for key in ("position-keyed", "content-keyed"):
                row = [counts[(kind, key, o)] for o in ("right", "other object", "absent value")]
                if sum(row):
                    print(f"| {kind} | {key} | {row[0]}/{sum(row)} = {row[0] / sum(row):.2f} | {row[1]} | {row[2]} |")
        probes = [s for s in eval_sets(args.split, args.n, 0, words.image_side(processor), ("attr/position",))
                  ["attr/position"] if len(s.meta["objects"]) > 1][:args.attention]
        layers = attention_to_target(model, processor, probes)
        print("attention of the last prompt token, content-keyed position questions, best head per layer "
              "(named object / another object): " + ", ".join(f"{t:.2f} / {o:.2f}" for t, o in layers))
        if args.probe_scenes:
            probe = vision_probe(model, processor, args.split, args.probe_scenes)
            print("linear probe of the vision features at an object's centre patch, per layer (colour / shape / "
                  "cell): " + ", ".join(f"{c:.2f} / {s:.2f} / {p:.2f}" for c, s, p in probe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
