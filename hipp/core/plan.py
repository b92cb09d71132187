"""A hard pruning plan: which layers, heads and MLP channel groups survive, and what that costs.

Where the space has token levels, the plan also says how many of each level's tokens survive
(`token_keep`, whole counts); the weights' gates stay the (layer, heads, channels) triple.

Masks are 0/1 float tensors in PruneSpace layer order with the hierarchy applied (a dropped
layer keeps no heads or channels). On disk a plan lists kept *indices* per layer, the readable
form a materialiser or a person needs; costs are always recomputed from the space, never trusted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import HippError
from ..storage.fileio import read_json, write_json
from .gates import Gates, couple
from .space import PruneSpace

FORMAT = "hipp-plan"
VERSION = 1


def _token_counts(x, space: PruneSpace) -> torch.Tensor:
    """[levels] whole counts in [1, tokens] per level (every token where x is None)."""
    if x is None:
        return space.all_tokens()
    t = torch.as_tensor(x, dtype=torch.float64).detach().cpu().reshape(-1)
    if len(t) != len(space.tokens):
        raise HippError(f"plan keeps tokens at {len(t)} levels; its space has {len(space.tokens)}")
    for k, level in zip(t.tolist(), space.tokens):
        if k != int(k) or not 1 <= k <= level.tokens:
            raise HippError(f"plan keeps {k:g} of the {level.tokens} {level.stage} tokens; "
                            f"expected a whole number from 1 to {level.tokens}")
    return t


def _hard(x, n: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).detach().cpu()
    if t.shape != (n,):
        raise HippError(f"plan {what} has shape {tuple(t.shape)}, expected ({n},)")
    if not bool(((t == 0) | (t == 1)).all()):
        raise HippError(f"plan {what} must be hard 0/1 gates")
    return t


@dataclass
class Plan:
    space: PruneSpace
    layer_keep: torch.Tensor            # [L]
    head_keep: list[torch.Tensor]       # per layer [num_heads]
    channel_keep: list[torch.Tensor]    # per layer [num_channel_gates]
    preference: dict[str, float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # free-form provenance, e.g. {"max_flops": 0.5}
    token_keep: torch.Tensor | None = None  # [levels] kept counts; None: every token

    def __post_init__(self):
        layers = self.space.layers
        if len(self.head_keep) != len(layers) or len(self.channel_keep) != len(layers):
            raise HippError(f"plan has {len(self.head_keep)} head / {len(self.channel_keep)} channel masks "
                            f"for {len(layers)} layers")
        gates = (_hard(self.layer_keep, len(layers), "layer_keep"),
                 [_hard(h, l.num_heads, f"head_keep[{i}]") for i, (h, l) in enumerate(zip(self.head_keep, layers))],
                 [_hard(c, l.num_channel_gates, f"channel_keep[{i}]")
                  for i, (c, l) in enumerate(zip(self.channel_keep, layers))])
        self.layer_keep, self.head_keep, self.channel_keep = couple(gates)
        self.preference = {k: float(v) for k, v in self.preference.items()}
        self.token_keep = _token_counts(self.token_keep, self.space)

    @classmethod
    def from_gates(cls, space: PruneSpace, gates: Gates, preference=None, meta=None, token_keep=None) -> "Plan":
        """From one unbatched hard gate triple (hierarchy is applied here if it was not)."""
        layer, heads, channels = gates
        return cls(space, layer, list(heads), list(channels), dict(preference or {}), dict(meta or {}), token_keep)

    @classmethod
    def dense(cls, space: PruneSpace, preference=None) -> "Plan":
        return cls.from_gates(space, space.all_kept(), preference)

    @property
    def gates(self) -> Gates:
        """The (layer, heads, channels) triple a gated model takes."""
        return self.layer_keep, self.head_keep, self.channel_keep

    def mask_key(self) -> bytes:
        """Identity of the hard masks alone (preferences differ, plans often coincide)."""
        return b"".join(t.bool().numpy().tobytes() for t in (self.layer_keep, *self.head_keep, *self.channel_keep)) \
            + self.token_keep.numpy().tobytes()

    @property
    def prunes_tokens(self) -> bool:
        return bool((self.token_keep < self.space.all_tokens()).any())

    # --- indices, for materialising ---
    def kept_heads(self, i: int) -> list[int]:
        return torch.nonzero(self.head_keep[i]).flatten().tolist()

    def kept_channel_gates(self, i: int) -> list[int]:
        return torch.nonzero(self.channel_keep[i]).flatten().tolist()

    def kept_channels(self, i: int) -> list[int]:
        """MLP hidden indices kept in layer i (channel groups expanded)."""
        spec = self.space.layers[i]
        g = spec.channel_group
        return [c for j in self.kept_channel_gates(i) for c in range(j * g, min((j + 1) * g, spec.mlp_hidden))]

    # --- costs ---
    def costs(self) -> dict[str, float]:
        """Absolute FLOPs / params per tower and in total, with ratios vs the dense model."""
        got = {k: float(v) for k, v in self.space.costs(*self.gates, self.token_keep).items()}
        dense = self.space.dense_costs()
        out = dict(got)
        for kind in ("flops", "params"):
            stages = self.space.stages
            total, dense_total = sum(got[f"{kind}/{t}"] for t in stages), sum(dense[f"{kind}/{t}"] for t in stages)
            out[kind] = total
            out[f"{kind}_ratio"] = total / dense_total
            for t in stages:
                out[f"{kind}_ratio/{t}"] = got[f"{kind}/{t}"] / dense[f"{kind}/{t}"] if dense[f"{kind}/{t}"] else 1.0
        return out

    def summary(self) -> dict:
        """What `hipp query --json` prints: totals, and per tower the kept structure and its ratios."""
        c = self.costs()
        out = {"preference": dict(self.preference),
               "flops_ratio": c["flops_ratio"], "params_ratio": c["params_ratio"],
               "flops": c["flops"], "params": c["params"]}
        for t in self.space.stages:
            idx = [i for i, l in enumerate(self.space.layers) if l.tower == t]
            out[t] = {
                "layers_kept": [bool(self.layer_keep[i]) for i in idx],
                "heads_kept": [int(self.head_keep[i].sum()) for i in idx],
                "channels_kept": [len(self.kept_channels(i)) for i in idx],
                "flops_ratio": c[f"flops_ratio/{t}"], "params_ratio": c[f"params_ratio/{t}"],
                "flops": c[f"flops/{t}"], "params": c[f"params/{t}"],
            }
            for level, k in zip(self.space.tokens, self.token_keep.tolist()):
                if level.stage == t:
                    out[t]["tokens_kept"] = int(k)
        if self.meta:
            out["meta"] = dict(self.meta)
        return out

    # --- JSON ---
    def to_dict(self) -> dict:
        layers = [{"tower": l.tower, "index": l.index, "kept": bool(self.layer_keep[i]),
                   "heads": self.kept_heads(i), "channel_gates": self.kept_channel_gates(i)}
                  for i, l in enumerate(self.space.layers)]
        c = self.costs()
        return {"format": FORMAT, "version": VERSION, "preference": dict(self.preference), "meta": dict(self.meta),
                "flops_ratio": c["flops_ratio"], "params_ratio": c["params_ratio"],  # informative only
                "layers": layers, "space": self.space.to_dict(),
                **({"tokens": [{"stage": level.stage, "kept": int(k), "of": level.tokens, "rule": level.rule}
                               for level, k in zip(self.space.tokens, self.token_keep.tolist())]}
                   if self.space.tokens else {})}

    @classmethod
    def from_dict(cls, d: dict, where: str = "plan") -> "Plan":
        if d.get("format") != FORMAT:
            raise HippError(f"{where} is not a HiPP plan (format {d.get('format')!r})")
        if d.get("version") != VERSION:
            raise HippError(f"{where} has plan version {d.get('version')!r}; this HiPP reads version {VERSION}")
        try:
            space = PruneSpace.from_dict(d["space"])
            entries = list(d["layers"])
        except (KeyError, TypeError, ValueError) as e:
            raise HippError(f"{where} has a malformed space or layer list ({e})") from None
        if len(entries) != len(space.layers):
            raise HippError(f"{where} lists {len(entries)} layers; its space has {len(space.layers)}")

        def mask(indices, n: int, what: str) -> torch.Tensor:
            m = torch.zeros(n, dtype=torch.float64)
            try:
                idx = [int(j) for j in indices]
            except (TypeError, ValueError):
                raise HippError(f"{where}: {what} must be a list of integer indices") from None
            bad = [j for j in idx if not 0 <= j < n]
            if bad:
                raise HippError(f"{where}: {what} index {bad[0]} is out of range [0, {n})")
            m[idx] = 1.0
            return m

        layer_keep, heads, channels = [], [], []
        for i, (e, spec) in enumerate(zip(entries, space.layers)):
            if not isinstance(e, dict) or not {"kept", "heads", "channel_gates"} <= set(e):
                raise HippError(f"{where}: layer entry {i} needs 'kept', 'heads' and 'channel_gates'")
            layer_keep.append(1.0 if e["kept"] else 0.0)
            heads.append(mask(e["heads"], spec.num_heads, f"layer {i} heads"))
            channels.append(mask(e["channel_gates"], spec.num_channel_gates, f"layer {i} channel_gates"))
        kept = None
        if space.tokens:
            levels = d.get("tokens")
            if not isinstance(levels, list) or len(levels) != len(space.tokens) or \
                    not all(isinstance(e, dict) and "kept" in e for e in levels):
                raise HippError(f"{where}: its space prunes tokens, so 'tokens' must list one entry with 'kept' "
                                f"per level ({len(space.tokens)})")
            kept = [e["kept"] for e in levels]
            if not all(isinstance(k, int) and not isinstance(k, bool) for k in kept):
                raise HippError(f"{where}: tokens 'kept' must be whole numbers")
        return cls(space, torch.tensor(layer_keep, dtype=torch.float64), heads, channels,
                   dict(d.get("preference") or {}), dict(d.get("meta") or {}), kept)

    def save(self, path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "Plan":
        return cls.from_dict(read_json(path), where=str(Path(path)))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return (self.space == other.space and self.preference == other.preference
                and torch.equal(self.layer_keep, other.layer_keep) and torch.equal(self.token_keep, other.token_keep)
                and all(torch.equal(a, b) for a, b in zip(self.head_keep, other.head_keep))
                and all(torch.equal(a, b) for a, b in zip(self.channel_keep, other.channel_keep)))
