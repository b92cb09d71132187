"""What a recovery run is configured with (the YAML of `hipp recover`), checked on creation so a bad
value is one line before any model loads.

Recovery is full fine-tuning of the exported (smaller) model by distillation from its base: every
weight of the export learns. Full fine-tuning is the default and the only mode because the exports
HiPP makes here are small (a few million parameters: a step costs less than the teacher's forward
pass it distils from) and because a pruned model has already lost the capacity that low-rank
adapters would have to stand in for; LoRA is the choice for billion-parameter bases and not here yet.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..data.shapes import MAX_NEGATIVES
from ..training.objectives import CONTRASTIVE_GROUNDING_MODES
from ..tasks import DEFAULT_TASK, get_task

RECOVER_SCHEDULES = ("constant", "cosine")


@dataclass
class RecoverConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-4
    lr_schedule: str = "cosine"     # after a linear warm-up of warmup_steps
    warmup_steps: int = 20
    weight_decay: float = 0.0
    cosine_weight: float = 1.0      # the utility loss's embedding term (training.objectives.utility_loss)
    # Keep the teacher's true-vs-hard-negative margins where batches have them. Squared, weight 3, five
    # negatives: chosen on validation (docs/studies/recovery-grounding.md); hinge at weight 1 or 10 let
    # validation grounding fall 1-2 points while utility rose.
    grounding_weight: float = 3.0
    grounding_mode: str = "squared"  # contrastive: training.objectives.grounding_loss's (hinge, squared or odds)
    task: str = DEFAULT_TASK        # where batches and validation metrics come from (hipp.tasks)
    task_options: dict = field(default_factory=dict)
    shape_fraction: float = 0.5     # the embedded task's data mix
    negatives: int = 5
    eval_every: int = 50            # validation utility every this many steps (and before the first)
    val_size: int = 500             # validation items per dataset (the task's val split)
    patience: int = 2               # evaluations without a better validation utility before stopping; 0: never
    keep_grounding: bool = True     # a checkpoint is kept only if its validation grounding is at least the start's
    # ... less this much, a tie: about two binomial standard errors of validation grounding at 500 scenes
    # with 5 kinds of hard negative (on validation, a strict floor refused a 0.3 export's whole recovery,
    # +7 points of utility, for a 0.05-point dip in grounding)
    grounding_tolerance: float = 0.01
    save_every: int = 50
    seed: int = 0
    tensorboard: bool = False       # also log to TensorBoard (under the output folder), as training does

    def __post_init__(self):
        from ..config import above, at_least, check_values, one_of, within

        check_values({
            "steps": (self.steps, at_least(1)), "batch_size": (self.batch_size, at_least(2)),
            "lr": (self.lr, above(0)), "lr_schedule": (self.lr_schedule, one_of(RECOVER_SCHEDULES)),
            "warmup_steps": (self.warmup_steps, at_least(0)), "weight_decay": (self.weight_decay, at_least(0)),
            "cosine_weight": (self.cosine_weight, at_least(0)), "grounding_weight": (self.grounding_weight, at_least(0)),
            "grounding_mode": (self.grounding_mode, one_of(CONTRASTIVE_GROUNDING_MODES)),
            "shape_fraction": (self.shape_fraction, within(0, 1, open_low=True)),
            "negatives": (self.negatives, within(0, MAX_NEGATIVES)), "eval_every": (self.eval_every, at_least(1)),
            "val_size": (self.val_size, at_least(10)), "patience": (self.patience, at_least(0)),
            "save_every": (self.save_every, at_least(1)), "grounding_tolerance": (self.grounding_tolerance, within(0, 1)), "seed": (self.seed, within(-2**32, 2**32))})
        get_task(self.task, self.task_options)  # an unknown task or option fails here, before any model loads
