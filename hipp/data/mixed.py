"""Training batches mixing shape scenes (with hard negatives) and Fashion-MNIST.

A batch is a pure function of (seed, index): resumed and multi-process runs see exactly the
batches they should, with no sampler state to save.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import HippError
from . import shapes
from .fashion_mnist import CLASSES, TEMPLATES, load_fashion_mnist, to_rgb


@dataclass
class Batch:
    images: torch.Tensor    # uint8 [B, 3, S, S]; shape scenes first
    captions: list[str]     # B true captions
    groups: list[str]       # positive-group key per sample (same key: same meaning)
    negatives: list[str]    # n_negatives per shape scene, scene-major
    n_shapes: int
    n_negatives: int


class MixedBatches:
    def __init__(self, seed: int, batch_size: int, shape_fraction: float, n_negatives: int, image_size: int,
                 required_negatives: tuple[str, ...] = ()):
        self.seed, self.batch_size, self.n_negatives, self.size = seed, batch_size, n_negatives, image_size
        if not 0 <= n_negatives <= shapes.MAX_NEGATIVES:  # a batch holds as many for every scene
            raise HippError(f"negatives must be between 0 and {shapes.MAX_NEGATIVES} (the hard negatives every "
                            f"scene has), got {n_negatives}")
        self.required = tuple(required_negatives)  # kinds always drawn (when the scene has them)
        unknown = set(self.required) - set(shapes.NEGATIVE_TYPES)
        if unknown or len(self.required) > n_negatives:
            raise HippError(f"required negatives {sorted(self.required)} must be at most {n_negatives} of "
                            f"{shapes.NEGATIVE_TYPES}")
        self.n_shapes = round(batch_size * shape_fraction)
        self.fm_images, self.fm_labels = load_fashion_mnist("train") if self.n_shapes < batch_size else (None, None)

    def __call__(self, index: int) -> Batch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        scenes = shapes.make_scenes("train", self.n_shapes, seed=self.seed, image_size=self.size,
                                    start=index * self.n_shapes)
        negatives = []
        for negs in scenes.negatives:
            first = [k for k in self.required if k in negs]
            kinds = [k for k in sorted(negs) if k not in first]
            pick = torch.randperm(len(kinds), generator=g)[:self.n_negatives - len(first)].tolist()
            negatives += [negs[k] for k in first] + [negs[kinds[i]] for i in pick]
        images, captions, groups = [scenes.images], list(scenes.captions), list(scenes.captions)
        n_fm = self.batch_size - self.n_shapes
        if n_fm:
            idx = torch.randint(len(self.fm_labels), (n_fm,), generator=g)
            fm = to_rgb(self.fm_images[idx], self.size)
            flip = torch.rand(n_fm, generator=g) < 0.5
            fm[flip] = fm[flip].flip(-1)
            labels = self.fm_labels[idx].tolist()
            templates = torch.randint(len(TEMPLATES), (n_fm,), generator=g).tolist()
            images.append(fm)
            captions += [TEMPLATES[t].format(CLASSES[c]) for t, c in zip(templates, labels)]
            groups += [f"fashion-mnist:{c}" for c in labels]
        return Batch(torch.cat(images), captions, groups, negatives, self.n_shapes, self.n_negatives)
