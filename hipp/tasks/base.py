"""What a controller is trained and judged on: a task supplies training batches, a calibration set,
metrics on a model and the definition of utility (which metrics make it).

Training batches are a pure function of (seed, index), as MixedBatches are: a resumed or
multi-process run asks for the same indices and must get the same pixels, with no sampler state.
Tasks register by name; the training config's `task` picks one and `task_options` configure it.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import ClassVar

from ..data.mixed import Batch
from ..errors import HippError

Batches = Callable[[int], Batch]

TASKS: dict[str, type["Task"]] = {}
REQUIRED = object()  # an option default: the option must be given


def register(cls: type["Task"]) -> type["Task"]:
    """Class decorator: make a task available to get_task (and configs) under `cls.name`."""
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"two tasks named {cls.name!r}")
    TASKS[cls.name] = cls
    return cls


def get_task(name: str, options: dict | None = None) -> "Task":
    if name not in TASKS:
        raise HippError(f"unknown task {name!r}; choose from {', '.join(sorted(TASKS))}")
    return TASKS[name](dict(options or {}))


class Task(abc.ABC):
    name: ClassVar[str]
    # the models it serves: "contrastive" (open_clip, CLIP, SigLIP) or "generative" (LLaVA)
    family: ClassVar[str] = "contrastive"
    # Whether training batches carry hard-negative captions; the grounding objective needs them.
    has_negatives: ClassVar[bool]
    utility_keys: ClassVar[tuple[str, ...]]
    # the metric that says how well hard negatives are told apart (None: the task has none)
    grounding_key: ClassVar[str | None] = None
    # option name -> (accepted types, default); REQUIRED marks one with no default
    options: ClassVar[dict[str, tuple[tuple[type, ...], object]]] = {}

    def __init__(self, options: dict):
        self.opts = self._parse(options)

    def _parse(self, given: dict) -> dict:
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            takes = f"it takes {', '.join(sorted(self.options))}" if self.options else "it takes none"
            raise HippError(f"task {self.name!r} has no option {unknown[0]!r}; {takes}")
        out = {}
        for key, (types, default) in self.options.items():
            if key not in given:
                if default is REQUIRED:
                    raise HippError(f"task {self.name!r} needs the option task_options.{key}")
                out[key] = default
                continue
            value = given[key]
            # bool is an int to isinstance; an option that wants a count must not take `true`
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise HippError(f"task option task_options.{key} must be {want}, got {value!r}")
            out[key] = value
        return out

    def check_model(self, model_family: str) -> None:
        """Refuse a model this task's data and metrics do not fit, before training starts."""
        kind = "generative" if model_family == "llava" else "contrastive"
        if kind != self.family:
            fitting = sorted(name for name, task in TASKS.items() if task.family == kind)
            raise HippError(f"task {self.name!r} serves {self.family} models; a {model_family} model takes "
                            f"task {' or '.join(fitting)}")

    def check_objectives(self, names: Sequence[str]) -> None:
        """Refuse objectives this task's data cannot train, before any model loads."""
        if "grounding" in names and not self.has_negatives:
            raise HippError(f"task {self.name!r} has no hard-negative captions, so it cannot train the "
                            "grounding objective; remove 'grounding' from objectives.names")

    @abc.abstractmethod
    def batches(self, seed: int, batch_size: int, image_size: int, *, shape_fraction: float = 0.5,
                negatives: int = 2) -> Batches:
        """index -> Batch of `batch_size` uint8 images at `image_size`, a pure function of (seed, index).
        `shape_fraction` and `negatives` are the embedded data mix's; other tasks ignore them."""

    @abc.abstractmethod
    def calibration_batch(self, image_size: int, size: int, seed: int, *, shape_fraction: float = 0.5,
                          negatives: int = 1) -> Batch:
        """At most `size` pairs never trained on, for the data-driven baselines and polishing."""

    @abc.abstractmethod
    def metrics(self, model, tokenizer, preprocess_cfg: dict, split: str = "test",
                size: int | None = None) -> dict[str, float]:
        """Flat `dataset/metric` floats of `model`, among them every one of `utility_keys`, on the task's
        `split` ("val" for choices, "test" for reports), at most `size` items per dataset when given."""

    def utility(self, metrics: dict) -> float:
        from ..evaluation.pareto import utility_of
        return utility_of(metrics, self.utility_keys)

