"""The generative task: the embedded instruction samples (captions, attribute questions, POPE probes,
Fashion-MNIST) a LLaVA-style model answers, with the metrics of hipp.evaluation.generative.

A training batch is a run of consecutive samples of the train split, so every kind comes in turn
(instruct.make_samples cycles through them); its POPE probes are what the grounding objective
(agreement with the teacher's yes / no) trains on.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..data.instruct import KINDS, Sample, make_samples
from ..evaluation.answers import GROUNDING_KEY, UTILITY_KEYS
from .base import Batches, Task, register

CALIBRATION_SPLIT = "val"  # never trained on, as the contrastive task's calibration pairs


@dataclass(frozen=True)
class InstructBatch:
    samples: list[Sample]


@register
class InstructTask(Task):
    name = "instruct"
    family = "generative"
    has_negatives = True  # POPE probes about absent objects: what the grounding objective keeps
    utility_keys = UTILITY_KEYS
    grounding_key = GROUNDING_KEY

    def batches(self, seed: int, batch_size: int, image_size: int, *, shape_fraction: float = 0.5,
                negatives: int = 2, kinds: tuple[str, ...] = KINDS) -> Batches:
        """Training batches; `kinds` (default every kind in turn) may weigh some kinds more."""
        def batch(index: int) -> InstructBatch:
            return InstructBatch(make_samples("train", batch_size, seed=seed, image_size=image_size,
                                              start=index * batch_size, kinds=kinds))
        return batch

    def calibration_batch(self, image_size: int, size: int, seed: int, *, shape_fraction: float = 0.5,
                          negatives: int = 1) -> InstructBatch:
        return InstructBatch(make_samples(CALIBRATION_SPLIT, size, seed=seed, image_size=image_size))

    def metrics(self, model, tokenizer, preprocess_cfg: dict, split: str = "test",
                size: int | None = None) -> dict[str, float]:
        """`tokenizer` is the model's LlavaProcessor; `size` samples of each kind (default 200)."""
        from ..evaluation.generative import evaluate_generative
        return evaluate_generative(model, tokenizer, split=split, n=size or 200, latency=False)["metrics"]
