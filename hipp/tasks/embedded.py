"""The embedded task: procedural shape scenes (with hard negatives) mixed with Fashion-MNIST.

Everything delegates to what existed before tasks did (MixedBatches, evaluate, UTILITY_KEYS), so a
config without `task` trains the same controller, tensor for tensor, and the baselines calibrate on
the same batch.
"""
from __future__ import annotations

from ..data.mixed import Batch, MixedBatches
from ..evaluation.pareto import GROUNDING_KEY, UTILITY_KEYS
from .base import Batches, Task, register


@register
class EmbeddedTask(Task):
    name = "shapes-fmnist"
    has_negatives = True
    utility_keys = UTILITY_KEYS
    grounding_key = GROUNDING_KEY

    def batches(self, seed: int, batch_size: int, image_size: int, *, shape_fraction: float = 0.5,
                negatives: int = 2) -> Batches:
        return MixedBatches(seed, batch_size, shape_fraction, negatives, image_size)

    def calibration_batch(self, image_size: int, size: int, seed: int, *, shape_fraction: float = 0.5,
                          negatives: int = 1) -> Batch:
        return MixedBatches(seed, size, shape_fraction, negatives, image_size)(0)

    def metrics(self, model, tokenizer, preprocess_cfg: dict, split: str = "test",
                size: int | None = None) -> dict[str, float]:
        from ..evaluation.evaluate import DATASETS, evaluate
        return evaluate(model, tokenizer, preprocess_cfg, DATASETS, n=size or 1000, fmnist_limit=size, split=split)
