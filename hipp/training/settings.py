"""What a controller training run is configured with (the YAML of `hipp train`), checked on creation
so a bad value is one line before any model loads."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..core.preference import DEFAULT_OBJECTIVES
from ..errors import HippError
from ..data.shapes import MAX_NEGATIVES
from ..tasks import DEFAULT_TASK, get_task
from ..core.preference import check_target_objectives
from .objectives import ObjectiveConfig

LR_SCHEDULES = ("constant", "cosine")  # see trainer.lr_factor


@dataclass
class ControllerCfg:
    hidden: int = 128
    rank: int = 16
    depth: int = 2
    init_bias: float = 3.0
    factorised: bool = True
    # a LLaVA's per-layer image attention as a controller input (hipp/training/sensitivity.py)
    visual_sensitivity: bool = False
    # one per-unit bias per quality objective, mixed by the preference's split (hipp/controller/network.py)
    quality_biases: bool = False


@dataclass
class DataCfg:
    batch_size: int = 64  # per preference group: a step sees pref_groups batches
    shape_fraction: float = 0.5
    negatives: int = 2


@dataclass
class TrainConfig:
    model: str = "checkpoints/teacher-tiny"
    pretrained: str | None = None
    family: str | None = None  # open_clip, clip or siglip: refuse a model of another family
    output: str = "runs/hipp-tiny"
    channel_group: int = 1
    seed: int = 0
    steps: int = 600
    pref_groups: int = 2
    dirichlet_alpha: float = 0.5
    vertex_prob: float = 0.0   # chance a preference group is a simplex vertex (one objective alone)
    lr: float = 3e-3
    lr_schedule: str = "constant"  # or "cosine": decay to 0 over the steps (see lr_factor)
    bias_lr_mult: float = 1.0  # the per-unit biases learn this many times faster (Controller.param_groups)
    target_prob: float = 0.0   # chance a preference group trains for a FLOPs target (module doc)
    target_range: list = field(default_factory=lambda: [0.2, 0.9])  # targets drawn uniformly in it
    target_penalty: float = 20.0  # weight of (expected FLOPs ratio - target)^2
    weight_decay: float = 0.0
    temperature_start: float = 1.0
    temperature_end: float = 0.1
    grad_accum: int = 1
    mixed_precision: str = "no"
    save_every: int = 100
    tensorboard: bool = False
    controller: ControllerCfg = field(default_factory=ControllerCfg)
    data: DataCfg = field(default_factory=DataCfg)
    objectives: dict = field(default_factory=lambda: {"names": list(DEFAULT_OBJECTIVES)})
    task: str = DEFAULT_TASK  # what the batches come from (hipp.tasks); data.* sizes its batches
    task_options: dict = field(default_factory=dict)  # the task's own settings, e.g. a CSV's path
    latency_profile: str | None = None  # a hipp profile file: needed by (and only by) the latency objective
    visual_tokens: str | None = None  # a rule ("text"): the controller also chooses a LLaVA's visual-token count

    def __post_init__(self):
        from ..config import above, at_least, check_values, finite, one_of, within

        # Python callers skip load_config's type checks, so every rule also refuses NaN / inf itself.
        check_values({
            "steps": (self.steps, at_least(1)), "pref_groups": (self.pref_groups, at_least(1)),
            "lr": (self.lr, above(0)), "channel_group": (self.channel_group, at_least(1)),
            "grad_accum": (self.grad_accum, at_least(1)), "save_every": (self.save_every, at_least(1)),
            "seed": (self.seed, within(-2**32, 2**32)),  # per-step seeds multiply it by about 2**26
            "dirichlet_alpha": (self.dirichlet_alpha, above(0)), "vertex_prob": (self.vertex_prob, within(0, 1)),
            "bias_lr_mult": (self.bias_lr_mult, above(0)), "target_prob": (self.target_prob, within(0, 1)),
            "target_penalty": (self.target_penalty, above(0)),
            "target_range": (self.target_range, (_is_range, "[low, high] with 0 < low <= high <= 1")),
            "weight_decay": (self.weight_decay, at_least(0)),
            "temperature_start": (self.temperature_start, above(0)),
            "temperature_end": (self.temperature_end, above(0)),
            "data.batch_size": (self.data.batch_size, at_least(2)),
            "data.shape_fraction": (self.data.shape_fraction, within(0, 1, open_low=True)),
            "data.negatives": (self.data.negatives, within(0, MAX_NEGATIVES)),
            "controller.hidden": (self.controller.hidden, at_least(1)),
            "controller.rank": (self.controller.rank, at_least(1)),
            "controller.depth": (self.controller.depth, at_least(1)),
            "controller.init_bias": (self.controller.init_bias, finite()),
            "mixed_precision": (self.mixed_precision, one_of(("no", "bf16", "fp16"))),
            "lr_schedule": (self.lr_schedule, one_of(LR_SCHEDULES))})
        objectives = ObjectiveConfig.from_dict(self.objectives)  # fail at load time, not after the model loads
        names = objectives.names
        task = get_task(self.task, self.task_options)
        if not objectives.utility_existence and task.family != "generative":
            raise HippError("objectives.utility_existence applies to a generative task's answers (task instruct)")
        if objectives.existence_margin != "yes-no" and task.family != "generative":
            raise HippError("objectives.existence_margin applies to a generative task's existence answers (task instruct)")
        if objectives.grounding_mode == "balanced" and task.family != "generative":
            raise HippError("objectives.grounding_mode balanced weighs a generative task's yes and no answers alike "
                            "(task instruct); a contrastive task takes hinge, squared or odds")
        if ("latency" in names) != (self.latency_profile is not None):
            raise HippError("the latency objective needs latency_profile (a file from hipp profile), and "
                            "latency_profile needs 'latency' among objectives.names")
        if self.target_prob > 0:
            check_target_objectives(names)
        from ..backends.decoder_tokens import RULE

        if self.visual_tokens is not None and self.visual_tokens != RULE:
            raise HippError(f"visual_tokens must be {RULE!r} (tokens ranked in the language model, the only rule "
                            f"whose soft gates equal dropping), got {self.visual_tokens!r}")
        if self.visual_tokens is not None and self.latency_profile is not None:
            raise HippError("a latency profile does not price visual tokens yet; train visual tokens with FLOPs")
        task.check_objectives(names)
        self.target_range = [float(x) for x in self.target_range]


def _is_range(r) -> bool:
    try:
        lo, hi = (float(x) for x in r)
    except (TypeError, ValueError):
        return False
    return 0 < lo <= hi <= 1
