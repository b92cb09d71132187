"""The controller: a small hypernetwork from a preference to a logit for every prunable unit.

    pref [B, K] -> trunk MLP -> h [B, hidden]
    unit logit = per-unit bias                          (what every preference shares)
               + low-rank head: h -> rank -> units      (per tower and kind: layer / head / channel)
               + budget shift:  h -> one scalar per tower and kind   (an overall sparsity level)
               + allocation:    h -> one scalar per layer and kind   (how a layer's width is spent)

With `flops_target`, the trunk also reads a FLOPs target (two more inputs: a flag and the ratio;
both 0 for a plain preference), trained in some preference groups with the cost weights replaced
by a penalty that holds the expected FLOPs at the target. A bound query can then ask for a plan
made for that very cost, as a fixed-budget run would train one, instead of only searching the
preferences for a plan that happens to land near it.

With `visual_sensitivity` (a LLaVA), each layer also carries a fixed score, how much its
prompt tokens attend to the image (hipp/training/sensitivity.py), and one more map h -> three gains
adds gain x score to every layer, head and channel logit of the layer: a preference can then spare
(or spend) the layers that read the image as a whole, as HiPP-Prune's policy reads the signal.

Where the space has a token level (a LLaVA's visual tokens), one more linear map h -> chunk logits
chooses how many tokens a plan keeps (hipp/core/token_gates.py); `forward(..., with_tokens=True)`
returns them beside the gate logits and `plan` turns them into the plan's count.

With `quality_biases`, the per-unit bias is one vector per quality objective (utility, grounding, ...),
mixed by the preference's split between them (its quality weights renormalised; an even mix where a
preference has none): a split then reorders the units directly, as weight-ensemble Pareto methods
mix one set of weights per objective, where a shared bias left the split only the low-rank head's
small, preference-wide pull and every split ranked the units alike.

The budget / allocation terms are the "overall budget x layer allocation" factorisation: a
preference can move every unit of a kind together with one scalar, which makes the trade-off
easy to steer, while the low-rank heads choose *which* units go. All preference-dependent
outputs start at zero and the biases at `init_bias`, so every preference starts at the dense
model (keep-probability sigmoid(3) ~ 0.95).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..core.budget import check_bounds
from ..errors import HippError
from ..storage.fileio import save_tensors, write_json
from ..core.gates import Gates, hard_plan, keep_prob, map_gates, sample_gates
from ..core.plan import Plan
from ..core.preference import COSTS, DEFAULT_OBJECTIVES, as_dict, check_target_objectives
from ..core.space import PruneSpace
from ..core import token_gates

CONFIG_NAME = "controller.json"
WEIGHTS_NAME = "controller.safetensors"
FORMAT = "hipp-controller"
VERSION = 1
KINDS = ("layer", "head", "channel")
MIX_FLOOR = 1e-3  # added to each quality weight before the split is taken: an even mix where all are 0


def prunable_params(space: PruneSpace) -> float:
    """Parameters inside the prunable blocks of the dense model (everything but embeddings etc.)."""
    dense = space.dense_costs()
    return sum(dense[f"params/{t}"] - space.fixed_params.get(t, 0.0) for t in space.stages)


class Controller(nn.Module):
    def __init__(self, space: PruneSpace, objective_names=DEFAULT_OBJECTIVES, hidden: int = 256,
                 rank: int = 32, depth: int = 2, init_bias: float = 3.0, factorised: bool = True,
                 flops_target: bool = False, visual_sensitivity: bool = False, quality_biases: bool = False):
        super().__init__()
        names = list(objective_names)
        if not names or len(set(names)) != len(names):
            raise HippError(f"objective names must be non-empty and distinct, got {names}")
        if hidden < 1 or rank < 1 or depth < 1:
            raise HippError(f"controller hidden, rank and depth must be >= 1, got {hidden}, {rank}, {depth}")
        self.space = space
        self.objective_names = names
        if flops_target:
            check_target_objectives(names)
        self.quality = [i for i, n in enumerate(names) if n not in COSTS]
        if quality_biases and len(self.quality) < 2:
            raise HippError(f"quality_biases needs two or more quality objectives to mix, got {names}")
        self.hparams = {"hidden": hidden, "rank": rank, "depth": depth, "init_bias": init_bias,
                        "factorised": factorised, "flops_target": bool(flops_target),
                        "visual_sensitivity": bool(visual_sensitivity), "quality_biases": bool(quality_biases)}
        self.fingerprint = ""
        self.extra: dict = {}

        layers = [nn.Linear(len(names) + 2 * bool(flops_target), hidden), nn.GELU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.GELU()]
        self.trunk = nn.Sequential(*layers)

        # Groups are (tower, kind); each owns a contiguous slice of units in PruneSpace layer order.
        towers = [t for t in space.stages if space.tower_layers(t)]
        self.groups: list[tuple[str, str, list[int], list[int]]] = []  # tower, kind, layer indices, sizes
        for t in towers:
            idx = [i for i, l in enumerate(space.layers) if l.tower == t]
            self.groups.append((t, "layer", idx, [1] * len(idx)))
            self.groups.append((t, "head", idx, [space.layers[i].num_heads for i in idx]))
            self.groups.append((t, "channel", idx, [space.layers[i].num_channel_gates for i in idx]))
        self.down = nn.ModuleDict()
        self.up = nn.ModuleDict()
        self.bias = nn.ParameterDict()
        for t, kind, _, sizes in self.groups:
            key = f"{t}_{kind}"
            self.down[key] = nn.Linear(hidden, rank, bias=False)
            self.up[key] = nn.Linear(rank, sum(sizes), bias=False)
            nn.init.zeros_(self.up[key].weight)
            shape = (len(self.quality), sum(sizes)) if quality_biases else (sum(sizes),)
            self.bias[key] = nn.Parameter(torch.full(shape, float(init_bias)))
        if factorised:
            n_layers = len(space.layers)
            self.budget = nn.Linear(hidden, len(self.groups))      # one shift per (tower, kind)
            self.allocation = nn.Linear(hidden, 2 * n_layers)      # per layer: heads shift, channels shift
            for lin in (self.budget, self.allocation):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        else:
            self.budget = self.allocation = None
        self.sense = None
        if visual_sensitivity:  # the scores are set by set_sensitivity and saved with the weights
            self.register_buffer("sensitivity", torch.zeros(len(space.layers)))
            self.sense = nn.Linear(hidden, len(KINDS))
            nn.init.zeros_(self.sense.weight)
            nn.init.zeros_(self.sense.bias)
        # a token level's chunk logits (hipp/core/token_gates.py): they start with every chunk kept
        self.token_gates = [token_gates.gates_of(level.tokens) for level in space.tokens]
        self.tokens = None
        if space.tokens:
            self.tokens = nn.Linear(hidden, sum(self.token_gates))
            nn.init.zeros_(self.tokens.weight)
            with torch.no_grad():
                self.tokens.bias.copy_(torch.cat([token_gates.init_raw(g, init_bias) for g in self.token_gates]))

    # --- the map ---
    @property
    def tokens_arg(self) -> str | bool:
        """make_prunable's / describe's `tokens` for the space this controller plans in."""
        return self.space.tokens[0].rule if self.space.tokens else False

    @property
    def takes_target(self) -> bool:
        return self.hparams["flops_target"]

    def forward(self, pref: torch.Tensor, target: torch.Tensor | None = None, with_tokens: bool = False):
        """pref [B, K] (or [K]) on the simplex -> logits (layer [B, L], heads [B, h_l], channels [B, c_l]).

        `target` [B] (or a scalar): FLOPs ratios to plan for, NaN where a row has none. `with_tokens`:
        (those logits, a list of [B, G] chunk logits per token level of the space)."""
        single = pref.dim() == 1
        if single:
            pref = pref.unsqueeze(0)
        if pref.dim() != 2 or pref.shape[-1] != len(self.objective_names):
            raise HippError(f"controller expects preferences of shape [B, {len(self.objective_names)}], "
                            f"got {tuple(pref.shape)}")
        pref = pref.to(self.trunk[0].weight)
        split = self.quality_split(pref) if self.hparams["quality_biases"] else None
        if target is not None and not self.takes_target:
            raise HippError("this controller was trained without FLOPs targets")
        if self.takes_target:
            t = torch.full(pref.shape[:1], math.nan) if target is None else torch.as_tensor(target)
            t = t.to(pref).expand(pref.shape[0])
            given = torch.isfinite(t)
            pref = torch.cat([pref, given[:, None].to(pref), torch.where(given, t, 0.0)[:, None]], dim=-1)
        h = self.trunk(pref)
        batch = pref.shape[0]
        n_layers = len(self.space.layers)
        layer_logits = pref.new_zeros(batch, n_layers)
        heads: list = [None] * n_layers
        channels: list = [None] * n_layers
        budget = self.budget(h) if self.budget is not None else None
        alloc = self.allocation(h).view(batch, 2, n_layers) if self.allocation is not None else None
        if self.sense is not None:  # [B, 3, L]: each kind's gain times each layer's score
            per_layer = self.sense(h)[:, :, None] * self.sensitivity.to(h)
            alloc = per_layer[:, 1:] if alloc is None else alloc + per_layer[:, 1:]
        for g, (t, kind, idx, sizes) in enumerate(self.groups):
            key = f"{t}_{kind}"
            bias = self.bias[key] if split is None else split @ self.bias[key]
            out = bias + self.up[key](self.down[key](h))
            if budget is not None:
                out = out + budget[:, g:g + 1]
            if kind == "layer":
                if self.sense is not None:
                    out = out + per_layer[:, 0, idx]
                layer_logits = layer_logits.index_copy(1, torch.tensor(idx, device=h.device), out)
                continue
            for i, piece in zip(idx, out.split(sizes, dim=-1)):
                if alloc is not None:
                    piece = piece + alloc[:, 0 if kind == "head" else 1, i:i + 1]
                (heads if kind == "head" else channels)[i] = piece
        logits = (layer_logits, heads, channels)
        if single:
            logits = map_gates(lambda x: x.squeeze(0), logits)
        if not with_tokens:
            return logits
        # the trunk learns from the weights' gates only: trained through it with straight-through chunks,
        # the token head flattened it on the LLaVA teacher (every preference's plan at FLOPs 0.467)
        chunks = [] if self.tokens is None else \
            [token_gates.chunk_logits(raw) for raw in self.tokens(h.detach()).split(self.token_gates, dim=-1)]
        return logits, [c.squeeze(0) for c in chunks] if single else chunks

    def quality_split(self, pref: torch.Tensor) -> torch.Tensor:
        """[B, Q]: the preference's quality weights renormalised to sum 1 (the mix of quality biases)."""
        q = pref[:, self.quality] + MIX_FLOOR
        return q / q.sum(-1, keepdim=True)

    @torch.no_grad()
    def set_sensitivity(self, scores) -> None:
        """Each layer's visual-sensitivity score (PruneSpace layer order; a controller made with
        visual_sensitivity)."""
        if self.sense is None:
            raise HippError("this controller was made without visual_sensitivity")
        scores = torch.as_tensor(scores, dtype=self.sensitivity.dtype)
        if scores.shape != self.sensitivity.shape or not bool(torch.isfinite(scores).all()):
            raise HippError(f"visual sensitivity needs {len(self.space.layers)} finite scores, got {tuple(scores.shape)}")
        self.sensitivity.copy_(scores)

    @torch.no_grad()
    def token_counts(self, pref: torch.Tensor, target=None) -> torch.Tensor:
        """[B, levels] the whole token counts the plans of a batch of preferences keep."""
        dtype = self.trunk[0].weight.dtype
        _, chunks = self(pref.to(dtype), None if target is None else torch.as_tensor(target).to(dtype), with_tokens=True)
        counts = [token_gates.kept_count(token_gates.hard(c.double().cpu()), level.tokens)
                  for c, level in zip(chunks, self.space.tokens)]
        return torch.stack(counts, -1) if counts else torch.zeros(pref.shape[0], 0, dtype=torch.float64)

    def param_groups(self, bias_lr_mult: float = 1.0) -> list[dict]:
        """Optimiser groups: the per-unit biases (the logit part every preference shares, like the
        fixed-budget gates' free logits) with their own learning-rate multiplier, the rest at 1."""
        shared = lambda n: n.startswith("bias.") or n == "tokens.bias"  # noqa: E731  (chunk logits alike)
        bias = [p for n, p in self.named_parameters() if shared(n)]
        rest = [p for n, p in self.named_parameters() if not shared(n)]
        return [{"params": rest, "lr_mult": 1.0}, {"params": bias, "lr_mult": float(bias_lr_mult)}]

    def keep_probs(self, pref: torch.Tensor, target=None) -> Gates:
        """Uncoupled keep-probabilities: what PruneSpace.costs expects for expected costs."""
        return map_gates(keep_prob, self(pref, target))

    def sample(self, pref: torch.Tensor, temperature: float, generator: torch.Generator | None = None,
               hard: bool = True) -> Gates:
        """Training gates: Gumbel-sigmoid samples, straight-through 0/1 when `hard`."""
        return sample_gates(self(pref), temperature, generator, hard)

    def preference(self, pref) -> dict[str, float]:
        """Validate and normalise any preference form (SPEC string, mapping, sequence, tensor)."""
        return as_dict(pref, self.objective_names)

    @torch.no_grad()
    def plan(self, pref, meta: dict | None = None) -> Plan:
        """The deterministic hard plan for one preference (logit > 0, hierarchy applied)."""
        p = self.preference(pref)
        x = torch.tensor([p[n] for n in self.objective_names], dtype=self.trunk[0].weight.dtype,
                         device=self.trunk[0].weight.device)
        kept = self.token_counts(x[None])[0] if self.space.tokens else None
        return Plan.from_gates(self.space, map_gates(lambda t: t.detach().cpu().double(), hard_plan(self(x))), p, meta,
                               kept)

    @torch.no_grad()
    def plan_within(self, max_flops: float | None = None, max_params: float | None = None,
                    points: int = 101) -> Plan:
        """The plan closest to dense that meets a cost budget, from a sweep of preferences (no data):
        hipp.core.budget.sweep_within."""
        from ..core.budget import sweep_within

        return sweep_within(self, check_bounds(max_flops, max_params), points)

    # --- size ---
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def size_ratio(self) -> float:
        """Controller parameters / prunable parameters of the VLM it steers."""
        return self.num_parameters() / prunable_params(self.space)

    # --- save / load ---
    def config(self, fingerprint: str | None = None) -> dict:
        return {"format": FORMAT, "version": VERSION, "objective_names": list(self.objective_names),
                "hparams": dict(self.hparams),
                "fingerprint": self.fingerprint if fingerprint is None else str(fingerprint),
                "extra": dict(self.extra), "space": self.space.to_dict()}

    def save(self, directory, fingerprint: str | None = None, extra: dict | None = None) -> Path:
        """Write controller.safetensors then controller.json (both atomic; the JSON marks completion)."""
        directory = Path(directory)
        if fingerprint is not None:
            self.fingerprint = str(fingerprint)
        if extra is not None:
            self.extra = dict(extra)
        if not self.fingerprint.strip():  # load_controller refuses such a folder: do not write one
            raise HippError("a controller is saved with the weights fingerprint of its base model "
                            "(save(directory, fingerprint=...))")
        save_tensors(directory / WEIGHTS_NAME, dict(self.state_dict()))
        write_json(directory / CONFIG_NAME, self.config())
        return directory
