"""`hipp profile`: time a model's block kinds on one device and fit the latency model (hipp/core/latency.py).

Every timing runs a materialised model, so blocks are measured where they run, through the
backend's own code, and no backend needs a block-level entry point. For a block kind (the layers of
one stage with one shape) and a grid point (units u, channels c), the plan keeps at most `probe`
layers of that kind at (u, c) and drops every other layer; one block then costs
(time of that plan - time of the plan with every layer dropped) / layers kept. The plan with every
layer dropped gives each measure's fixed time.

Measures: a CLIP-style model's two towers, one per stage (encode_image, encode_text) at `batch` inputs; a
LLaVA's "prefill" (image + prompt tokens, the last position's logits, as generate asks) and
"decode" (a token against the prefill's KV cache), with a weight of `steps` decoded tokens. One
decoded token of a small model is a few milliseconds, as short as the box's timer noise, so a decode
call runs DECODE_TOKENS tokens in a row and its time is divided by them.
Inputs are synthetic: latency depends on shapes, not values.

Timings are medians of `repeats` rounds after `warmup`, the models of one grid point interleaved
(the order flips every round): the plan, the all-dropped model and the kind's full-size block on the
same layers. Machine speed drifts by ±15% over seconds on a shared 2-core box; it moves all three
alike, so each point is scaled to the kind's median full-block time. After the grid, `validation`
random plans are timed whole, interleaved with the dense materialisation, and the form whose
predicted latency ratio (plan / dense) is closest to the measured one becomes the profile's form.
"""
from __future__ import annotations

import copy
import math
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..core.latency import FORMAT, FORMS, VERSION, LatencyModel, shape_key
from ..core.plan import Plan
from ..core.space import PruneSpace
from ..errors import HippError

PROBE_LAYERS = 2  # layers of a kind kept per grid point: more averages noise, fewer is quicker
MAX_KNOTS = 9     # per axis
DECODE_TOKENS = 8  # decoded per timed call: one token alone was ~8 ms on the tiny LLaVA, mostly noise


@dataclass
class Measure:
    stages: tuple[str, ...]
    weight: float
    run: Callable[[torch.nn.Module, object], object]  # the timed call on a (materialised) model
    setup: Callable[[torch.nn.Module], object] | None = None  # untimed, before each call: run's state
    per_call: int = 1  # units of work (decoded tokens) one call runs; times are per unit


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clip_inputs(model, batch: int, device="cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and captions of the model's shapes (the end token half-way, where CLIP pools)."""
    from ..backends import context_length, image_size

    g = torch.Generator().manual_seed(seed)
    size, ctx = image_size(model), context_length(model)
    images = torch.randn(batch, 3, size, size, generator=g)
    vocab = 49408
    if getattr(model, "model_type", None) in ("clip", "siglip"):
        vocab = model.hf.config.text_config.vocab_size
    tokens = torch.randint(1, vocab - 1, (batch, ctx), generator=g)
    tokens[:, ctx // 2] = vocab - 1
    tokens[:, ctx // 2 + 1:] = 0
    return images.to(device), tokens.to(device)


def llava_inputs(model, space: PruneSpace, batch: int, device="cpu", seed: int = 0) -> dict:
    """A batch of image + prompt token ids as long as the space's declared prompt, and pixels."""
    cfg = model.config
    vision = cfg.vision_config
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    prompt = space.tower_layers(space.stages[-1])[0].tokens
    if prompt <= image_tokens:
        raise HippError(f"the declared prompt ({prompt} tokens) does not hold the {image_tokens} image tokens")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.image_token_index, (batch, prompt), generator=g)
    ids[:, 1:1 + image_tokens] = cfg.image_token_index
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=g)
    return {"input_ids": ids.to(device), "pixel_values": pixels.to(device),
            "attention_mask": torch.ones_like(ids).to(device)}


def measures_for(model, space: PruneSpace, batch: int, device, steps: int = 8) -> dict[str, Measure]:
    from ..storage.checkpoint import family

    if family(model) == "llava":
        inputs = llava_inputs(model, space, batch, device)
        mask = torch.ones_like(inputs["input_ids"][:, :1])

        def prefill(m, _=None):
            return m(**inputs, use_cache=True, logits_to_keep=1)

        def decode(m, cache):  # DECODE_TOKENS more tokens after the prompt, reading and extending a fresh cache
            attention = inputs["attention_mask"]
            for _ in range(DECODE_TOKENS):
                attention = torch.cat([attention, mask], 1)
                cache = m(input_ids=inputs["input_ids"][:, -1:], attention_mask=attention, cache=cache,
                          use_cache=True, logits_to_keep=1).cache
            return cache

        stages = space.stages  # the vision tower, then the decoder: a decoded token runs the decoder alone
        return {"prefill": Measure(tuple(stages), 1.0, prefill),
                "decode": Measure(stages[-1:], float(steps), decode, setup=lambda m: prefill(m).cache,
                                  per_call=DECODE_TOKENS)}
    images, tokens = clip_inputs(model, batch, device)
    stages = space.stages
    return {stages[0]: Measure((stages[0],), 1.0, lambda m, _=None: m.encode_image(images)),
            stages[1]: Measure((stages[1],), 1.0, lambda m, _=None: m.encode_text(tokens))}


class Timer:
    """Median wall time (ms) of measures on models; a measure's setup runs untimed before each call."""

    def __init__(self, measures: dict[str, Measure], device: torch.device, repeats: int, warmup: int):
        self.measures, self.device, self.repeats, self.warmup = measures, device, repeats, warmup

    def _once(self, model, name: str) -> float:
        measure = self.measures[name]
        state = measure.setup(model) if measure.setup else None
        _sync(self.device)
        t = time.perf_counter()
        measure.run(model, state)
        _sync(self.device)
        return (time.perf_counter() - t) * 1e3 / measure.per_call

    def times(self, models: list, name: str) -> list[float]:
        """Median ms of measure `name` on each model, rounds interleaved (the order flips each round)."""
        out = [[] for _ in models]
        with torch.inference_mode():
            for _ in range(self.warmup):
                for m in models:
                    self._once(m, name)
            for r in range(self.repeats):
                order = list(range(len(models)))[:: 1 if r % 2 == 0 else -1]
                for j in order:
                    out[j].append(self._once(models[j], name))
        return [statistics.median(t) for t in out]


def knots(n: int, step: int = 1) -> list[int]:
    """Grid counts for n units of size `step`: 0, one unit, then evenly spaced up to n (whole units)."""
    if n <= MAX_KNOTS - 1:
        return [k * step for k in range(n + 1)]
    picks = sorted({0, 1, *(round(n * j / (MAX_KNOTS - 2)) for j in range(1, MAX_KNOTS - 1))})
    return [min(k * step, n * step) for k in picks]


def grid_plan(space: PruneSpace, layers: list[int], units: int, channels: int) -> Plan:
    """Keep `layers` with their first `units` attention units and first `channels` MLP channels."""
    layer = torch.zeros(len(space.layers), dtype=torch.float64)
    heads, chans = [], []
    for i, spec in enumerate(space.layers):
        h = torch.zeros(spec.num_heads, dtype=torch.float64)
        c = torch.zeros(spec.num_channel_gates, dtype=torch.float64)
        if i in layers:
            layer[i] = 1.0
            h[:units] = 1.0
            c[: math.ceil(channels / spec.channel_group)] = 1.0
        heads.append(h)
        chans.append(c)
    return Plan.from_gates(space, (layer, heads, chans))


def random_plan(space: PruneSpace, g: torch.Generator, layer_p: float = 0.85) -> Plan:
    """Layers kept with probability layer_p; each kept layer a uniform count of random units and channel groups."""
    layer = (torch.rand(len(space.layers), generator=g) < layer_p).double()
    heads, chans = [], []
    for spec in space.layers:
        for n, out in ((spec.num_heads, heads), (spec.num_channel_gates, chans)):
            k = int(torch.randint(0, n + 1, (1,), generator=g))
            m = torch.zeros(n, dtype=torch.float64)
            m[torch.randperm(n, generator=g)[:k]] = 1.0
            out.append(m)
    return Plan.from_gates(space, (layer, heads, chans))


def kinds_of(space: PruneSpace, measure: Measure) -> list[tuple[dict, list[int]]]:
    """(shape, layer indices) of each block kind a measure runs, in layer order."""
    groups: dict[tuple, tuple[dict, list[int]]] = {}
    for i, spec in enumerate(space.layers):
        if spec.tower in measure.stages:
            key = shape_key(spec)
            groups.setdefault(tuple(sorted(key.items())), (key, []))[1].append(i)
    return list(groups.values())


def profile(model, space: PruneSpace, batch: int = 32, device: str = "cpu", repeats: int = 7, warmup: int = 2,
            validation: int = 8, probe: int = PROBE_LAYERS, steps: int = 8, progress: bool = True,
            seed: int = 0) -> dict:
    """Measure, fit and choose (module doc); returns the profile as a JSON-ready dict."""
    from tqdm.auto import tqdm

    from ..export.slicing import materialize

    dev = torch.device(device)
    measures = measures_for(model, space, batch, dev, steps)
    timer = Timer(measures, dev, repeats, warmup)
    small = lambda plan: materialize(model, plan).eval()  # noqa: E731
    empty = small(grid_plan(space, [], 0, 0))
    jobs = []
    for name, m in measures.items():
        for shape, layers in kinds_of(space, m):
            spec = space.layers[layers[0]]
            full = grid_plan(space, layers[:probe], spec.num_heads, spec.mlp_hidden)
            for u in knots(spec.num_heads):
                for c in knots(spec.num_channel_gates, spec.channel_group):
                    jobs.append((name, shape, layers[:probe], u, min(c, spec.mlp_hidden), full))
    raw: dict[tuple, dict] = {}  # (measure, shape) -> {(u, c): (t_empty, t_plan, t_full)}
    for name, shape, layers, u, c, full in tqdm(jobs, desc="profile", disable=not progress):
        key = (name, tuple(sorted(shape.items())))
        if key not in raw:
            raw[key] = {"measure": name, "shape": shape, "layers": len(layers), "full": small(full), "cells": {}}
        entry = raw[key]
        entry["cells"][(u, c)] = timer.times([empty, small(grid_plan(space, layers, u, c)), entry["full"]], name)
    kinds, fixed = [], {name: [] for name in measures}
    for entry in raw.values():
        # drift in machine speed moves all three timings of a point alike: scale each point so that its
        # full block takes the kind's median full-block time
        cells = entry["cells"]
        ref = statistics.median(t[2] for t in cells.values())
        scaled = {uc: [x * ref / t[2] for x in t] for uc, t in cells.items()}
        fixed[entry["measure"]] += [t[0] for t in scaled.values()]
        units, channels = sorted({u for u, _ in cells}), sorted({c for _, c in cells})
        ms = [[max(scaled[(u, c)][1] - scaled[(u, c)][0], 0.0) / entry["layers"] for c in channels] for u in units]
        kinds.append({"measure": entry["measure"], "shape": entry["shape"], "units": units, "channels": channels,
                      "ms": ms})
    out = {"format": FORMAT, "version": VERSION, "form": FORMS[0],
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
           "device_type": dev.type, "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": batch,
           "repeats": repeats, "probe_layers": probe,
           "measures": {n: {"stages": list(m.stages), "weight": m.weight, "fixed_ms": statistics.median(fixed[n])}
                        for n, m in measures.items()},
           "kinds": kinds}
    if validation:
        g = torch.Generator().manual_seed(seed + 1)
        plans = [random_plan(space, g) for _ in range(validation)]
        measured = measure_plans(model, space, plans, timer, progress)
        out["validation"] = {form: errors(LatencyModel(out, space, form), plans, measured) for form in FORMS}
        out["form"] = min(FORMS, key=lambda f: out["validation"][f]["mae"])
    return out


def measure_plans(model, space: PruneSpace, plans: list[Plan], timer: Timer, progress: bool = False) -> list[dict]:
    """Each plan's materialised model timed per measure in rounds interleaved with the dense one
    (materialised from the all-kept plan): {measure: ms, "dense/<measure>": ms, "ratio/<measure>": ...}."""
    from tqdm.auto import tqdm

    from ..export.slicing import materialize

    dense = materialize(model, Plan.dense(space)).eval()
    out = []
    for plan in tqdm(plans, desc="plans", disable=not progress):
        m = materialize(model, plan).eval()
        row = {}
        for name in timer.measures:
            t_plan, t_dense = timer.times([m, dense], name)
            row.update({name: t_plan, f"dense/{name}": t_dense, f"ratio/{name}": t_plan / t_dense})
        out.append(row)
    return out


def errors(model: LatencyModel, plans: list[Plan], measured: list[dict]) -> dict:
    """Mean absolute relative error of the predicted latency ratio (plan / dense) against the measured one
    (interleaved with the dense model, so drift in machine speed cancels), per measure and overall ("mae")."""
    per = {name: [] for name in model.names}
    for plan, got in zip(plans, measured):
        pred = model.predict(*plan.gates)
        for name in model.names:
            r = float(pred[name]) / model.dense_ms[name]
            per[name].append(abs(r - got[f"ratio/{name}"]) / got[f"ratio/{name}"])
    out = {f"mae/{n}": statistics.mean(v) for n, v in per.items()}
    out["mae"] = statistics.mean(out.values())
    return out


def run(args) -> int:
    """`hipp profile`: check the arguments, load the model, profile it, write the file atomically."""
    import json
    from pathlib import Path

    from ..backends import make_prunable
    from ..query.bound import check_device
    from ..storage.checkpoint import family, load_model
    from ..storage.fileio import write_json

    for name in ("batch", "repeats", "channel_group"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise HippError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.validation < 0:
        raise HippError(f"--validation must be 0 or more, got {args.validation}")
    if args.threads is not None:
        if args.threads < 1:
            raise HippError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.is_dir():
        raise HippError(f"--out {out} is a folder; give the profile's file name")
    if out.exists() and not args.overwrite:
        raise HippError(f"{out} exists; give --overwrite to replace it")
    device = check_device(args.device)
    model = load_model(args.model).to(device)
    space = make_prunable(model, args.channel_group)
    batch = args.batch or (8 if family(model) == "llava" else 32)
    prof = profile(model, space, batch=batch, device=str(device), repeats=args.repeats,
                   validation=args.validation, progress=not args.json)
    prof["model"], prof["channel_group"] = str(args.model), args.channel_group
    write_json(out, prof)
    summary = {"out": str(out), "form": prof["form"], "batch": batch, "threads": prof["threads"],
               "device": prof["device"], "fixed_ms": {n: m["fixed_ms"] for n, m in prof["measures"].items()},
               "dense_ms": LatencyModel(prof, space).dense_ms, "validation": prof.get("validation")}
    if args.json:
        print(json.dumps(summary))
    else:
        dense = ", ".join(f"{k} {v:.2f} ms" for k, v in summary["dense_ms"].items())
        chosen = prof.get("validation", {}).get(prof["form"], {}).get("mae")
        print(f"latency profile written to {out}: form {prof['form']}"
              + (f" (validation error {chosen:.1%})" if chosen is not None else "")
              + f"; dense predicted {dense} at batch {batch} on {prof['device']}, {prof['threads']} threads")
    return 0


def measure_export(base_model, space: PruneSpace, small, report: dict, repeats: int = 7) -> dict:
    """The measured side of an export's latency record: `small` (the materialised plan) timed per
    measure in rounds interleaved with the dense materialisation, at the profile's batch size, on
    this machine's device of the profile's type ({} with a reason when that device is not here)."""
    from ..export.slicing import materialize

    kind = report.get("device_type", "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        return {"measured": None, "why_not_measured": "the profile is for a CUDA device; this machine has none"}
    dev = torch.device(kind)
    dense = materialize(base_model, Plan.dense(space)).eval().to(dev)
    small = copy.deepcopy(small).to(dev)
    timer = Timer(measures_for(dense, space, report["batch"], dev), dev, repeats, 2)
    got, ref = {}, {}
    for name in timer.measures:
        got[name], ref[name] = timer.times([small, dense], name)
    weights = report["weights"]
    total = sum(weights[n] * got[n] for n in got) / sum(weights[n] * ref[n] for n in ref)
    return {"measured_ms": got, "dense_measured_ms": ref, "measured_ratio": total,
            "measured_threads": torch.get_num_threads()}
