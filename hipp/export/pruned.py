"""Export: a hard plan + the frozen base weights -> a physically smaller model folder.

    model.safetensors       the materialised model's state dict (the backend's key names, smaller shapes)
    pruned_config.json      base model_cfg, per-layer structure, the plan, preference, costs, the base
                            weights' fingerprint, preprocess cfg, parameter count
    open_clip_config.json   model_cfg + preprocess_cfg, so get_tokenizer / get_preprocess read the folder
    tokenizer files         instead, for a transformers base: its tokenizer, as save_pretrained writes it
    image_encoder.onnx      with --onnx: encode_image / encode_text (unnormalised embeddings, dynamic
    text_encoder.onnx       batch), each checked against onnxruntime before anything is published

`hipp.load_model(folder)` rebuilds the model from model_cfg + structure with the project's module
classes and loads model.safetensors strictly; no controller and no base weights are needed.

The folder is built in a hidden sibling and swapped into place (hipp.storage.outputs): a kill at any moment
leaves the earlier export or the new one, never a mix.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..backends.hf import TOKENIZER_FILES
from ..storage.checkpoint import CONFIG_NAME, PRUNED_CONFIG_NAME, PRUNED_FORMAT, PRUNED_VERSION, PRUNED_WEIGHTS_NAME
from ..storage import outputs
from ..errors import HippError
from ..storage.fileio import read_json, save_tensors, write_json
from ..core.plan import Plan

ONNX_FILES = {"image": "image_encoder.onnx", "text": "text_encoder.onnx"}
EXPORT_FILES = (PRUNED_WEIGHTS_NAME, PRUNED_CONFIG_NAME, CONFIG_NAME, *ONNX_FILES.values(), *TOKENIZER_FILES)
ONNX_ATOL = 1e-4
COMMAND = "export"


def _earlier_export(out: Path) -> bool:
    """A folder from before output markers that holds only export files, with HiPP's pruned config."""
    names = os.listdir(out)
    return (all(n in EXPORT_FILES for n in names) and PRUNED_CONFIG_NAME in names
            and read_json(out / PRUNED_CONFIG_NAME).get("format") == PRUNED_FORMAT)


def check_out(out, overwrite: bool = False) -> Path:
    """--out must be new, empty or an earlier export (or --overwrite given): outputs.check."""
    return outputs.check(out, COMMAND, overwrite, legacy=_earlier_export)


class _Encoder(torch.nn.Module):
    """One tower as a module with a single tensor input, the form torch.onnx.export traces."""

    def __init__(self, model, tower: str):
        super().__init__()
        self.model, self.tower = model, tower

    def forward(self, x):
        return self.model.encode_image(x) if self.tower == "image" else self.model.encode_text(x)


def export_onnx(model, folder: Path, images: torch.Tensor, tokens: torch.Tensor, atol: float = ONNX_ATOL) -> dict:
    """Write both encoders as ONNX and compare onnxruntime with torch on a batch of another size than
    the traced one (so the dynamic batch axis is checked too). Returns the max abs differences."""
    try:
        import numpy as np
        import onnx  # noqa: F401  (torch's exporter needs it)
        import onnxruntime as ort
    except ImportError:
        raise HippError("--onnx needs the onnx and onnxruntime packages (pip install 'hipp[onnx]')") from None
    diffs = {}
    for tower, x in (("image", images), ("text", tokens)):
        enc = _Encoder(model, tower).eval()
        path = folder / ONNX_FILES[tower]
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python control flow
            # the TorchScript-based exporter: it needs no onnxscript and handles the 0-head / 0-channel
            # branches (shape-derived zeros) with a dynamic batch
            torch.onnx.export(enc, (x[:2],), str(path), dynamo=False, opset_version=17,
                              input_names=[tower], output_names=["embedding"],
                              dynamic_axes={tower: {0: "batch"}, "embedding": {0: "batch"}})
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {tower: x.numpy()})[0]
        with torch.no_grad():
            want = enc(x).numpy()
        diff = float(np.abs(got - want).max())
        if not diff <= atol:
            raise HippError(f"ONNX {tower} encoder differs from torch by {diff:.2e} (> {atol:g}); nothing was written")
        diffs[tower] = diff
    return diffs


def export_pruned(base, plan: Plan, out, onnx: bool = False, compensate: bool = False, calib_n: int = 64,
                  overwrite: bool = False) -> dict:
    """Materialise `plan` on `base` (hipp.query.bound.Base) and write the export folder; returns a summary.

    compensate: FLAP-style bias compensation (slicing.compensate_bias) measured on `calib_n`
    calibration shape scenes plus as many Fashion-MNIST images when that dataset is installed.
    """
    from .. import __version__
    from ..backends import backend_for, describe
    from .slicing import compensate_bias, materialize, model_structure, structure
    from ..query.ranking import calibration
    from ..cli.query import summary

    backend = backend_for(base.model).name
    if backend == "llava" and (onnx or compensate):
        # both run the contrastive encoders (encode_image / encode_text) a LLaVA does not have
        raise HippError(f"{'--onnx' if onnx else '--compensate'} is not available for a llava model: "
                        "the export writes the PyTorch weights only")
    out = check_out(out, overwrite)
    gates = plan.gates
    compensated = None
    if compensate:
        images, texts = calibration(base, calib_n, seed=1, fmnist=calib_n)
        device = next(base.model.parameters()).device
        small = compensate_bias(base.model, *gates, images=images.to(device), texts=texts.to(device))
        compensated = {"images": len(images), "texts": len(texts)}
    else:
        small = materialize(base.model, *gates)
    small = small.cpu().eval().requires_grad_(False)  # saved, checked and exported from the CPU, wherever the base ran
    struct = structure(plan.space, *gates)
    if model_structure(small) != struct:
        raise AssertionError("materialised model does not have the plan's structure")
    costs = plan.costs()
    own = describe(small).dense_costs()  # the cost hipp eval will report for the export
    for t in plan.space.stages:
        if abs(own[f"flops/{t}"] - costs[f"flops/{t}"]) > 1e-6 * max(costs[f"flops/{t}"], 1.0):
            raise AssertionError(f"{t} FLOPs of the materialised model differ from the plan's")
    num_params = sum(p.numel() for p in small.parameters())
    config = {
        "format": PRUNED_FORMAT, "version": PRUNED_VERSION, "hipp_version": __version__, "backend": backend,
        "model_cfg": base.model_cfg, "preprocess_cfg": base.preprocess_cfg,
        "structure": struct, "num_params": num_params,
        "preference": dict(plan.preference), "meta": dict(plan.meta), "costs": costs,
        "base": {"model": base.spec, "pretrained": base.pretrained, "fingerprint": base.fingerprint},
        "compensated": compensated, "plan": plan.to_dict(),
    }
    with outputs.claim(out, COMMAND, overwrite, legacy=_earlier_export), outputs.staged(out, COMMAND) as stage:
        save_tensors(stage / PRUNED_WEIGHTS_NAME, small.state_dict())
        if backend == "open_clip":  # what open_clip's local-dir tokenizer / transform read
            write_json(stage / CONFIG_NAME, {"model_cfg": base.model_cfg, "preprocess_cfg": base.preprocess_cfg})
        elif base.tokenizer is not None:  # the transformers tokenizer files; preprocessing is in pruned_config.json
            # (a LLaVA base loaded without tokenizer files has none: the export then holds the model only)
            base.tokenizer.tokenizer.save_pretrained(str(stage))
        onnx_diffs = None
        if onnx:
            images, tokens = calibration(base, 3, seed=2)
            onnx_diffs = export_onnx(small, stage, images, tokens)
            config["onnx"] = {"files": dict(ONNX_FILES), "max_abs_diff": onnx_diffs, "atol": ONNX_ATOL,
                              "outputs": "unnormalised embeddings"}
        write_json(stage / PRUNED_CONFIG_NAME, config)
        files = sorted(os.listdir(stage))
    result = summary(plan)
    result.update({"out": str(out), "files": files, "num_params": num_params, "compensated": compensated,
                   "onnx_max_abs_diff": onnx_diffs, "base_fingerprint": base.fingerprint})
    return result


def run(args) -> int:
    """`hipp export`."""
    import json

    from ..cli.query import plan_from_args

    check_out(args.out, args.overwrite)  # before anything is loaded: a bad --out costs nothing
    _, plan, base = plan_from_args(args, need_base=True)
    result = export_pruned(base, plan, args.out, onnx=args.onnx, compensate=args.compensate,
                           overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"exported to {result['out']}: flops_ratio {result['flops_ratio']:.4f}, params_ratio "
              f"{result['params_ratio']:.4f}, {result['num_params']:,} parameters "
              f"(preference {result['preference_spec']})")
        if result["onnx_max_abs_diff"]:
            d = result["onnx_max_abs_diff"]
            print(f"onnx: image max abs diff {d['image']:.2e}, text {d['text']:.2e} (onnxruntime vs torch)")
    return 0
