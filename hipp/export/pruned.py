"""Export: a hard plan + the frozen base weights -> a physically smaller model folder.

    model.safetensors       the materialised model's state dict (the backend's key names, smaller shapes)
    pruned_config.json      base model_cfg, per-layer structure, the plan, preference, costs, the base
                            weights' fingerprint, preprocess cfg, parameter count
    open_clip_config.json   model_cfg + preprocess_cfg, so get_tokenizer / get_preprocess read the folder
    tokenizer files         instead, for a transformers base: its tokenizer, as save_pretrained writes it
    processor files         a LLaVA base folder's processor (tokenizer, image processor), when it has one
    *.onnx                  with --onnx (export/onnx.py): a CLIP model's two encoders, a LLaVA's image
                            features (vision tower + projector; not the decoder)

`hipp.load_model(folder)` rebuilds the model from model_cfg + structure with the project's module
classes and loads model.safetensors strictly; no controller and no base weights are needed.

The folder is built in a hidden sibling and swapped into place (hipp.storage.outputs): a kill at any moment
leaves the earlier export or the new one, never a mix.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..backends import visual_tokens
from ..backends.hf import TOKENIZER_FILES
from ..storage.checkpoint import (CONFIG_NAME, PROCESSOR_FILES, PRUNED_CONFIG_NAME, PRUNED_FORMAT, PRUNED_VERSION,
                                  PRUNED_WEIGHTS_NAME)
from ..storage import outputs
from ..errors import HippError
from ..storage.fileio import read_json, save_tensors, write_json
from ..core.plan import Plan
from .onnx import LLAVA_ONNX_FILE, ONNX_ATOL, ONNX_FILES, export_llava_onnx, export_onnx

EXPORT_FILES = (PRUNED_WEIGHTS_NAME, PRUNED_CONFIG_NAME, CONFIG_NAME, *ONNX_FILES.values(), LLAVA_ONNX_FILE,
                *TOKENIZER_FILES, *PROCESSOR_FILES)
COMMAND = "export"


def _earlier_export(out: Path) -> bool:
    """A folder from before output markers that holds only export files, with HiPP's pruned config."""
    names = os.listdir(out)
    return (all(n in EXPORT_FILES for n in names) and PRUNED_CONFIG_NAME in names
            and read_json(out / PRUNED_CONFIG_NAME).get("format") == PRUNED_FORMAT)


def check_out(out, overwrite: bool = False) -> Path:
    """--out must be new, empty or an earlier export (or --overwrite given): outputs.check."""
    return outputs.check(out, COMMAND, overwrite, legacy=_earlier_export)


def export_pruned(base, plan: Plan, out, onnx: bool = False, compensate: bool = False, calib_n: int = 64,
                  overwrite: bool = False, reconstruct: int = 0) -> dict:
    """Materialise `plan` on `base` (hipp.query.bound.Base) and write the export folder; returns a summary.

    compensate: FLAP-style bias compensation (slicing.compensate_bias) measured on `calib_n`
    calibration shape scenes plus as many Fashion-MNIST images when that dataset is installed.
    reconstruct: the kept output projections refitted by least squares to the base's branch outputs
    on this many training instructions (a LLaVA) or training images and captions (a CLIP model; as
    many Fashion-MNIST images when installed); export/reconstruct.py; 0: not.
    """
    from .. import __version__
    from ..backends import backend_for, describe
    from .slicing import compensate_bias, materialize, model_structure, structure
    from ..query.ranking import calibration
    from ..cli.query import summary

    backend = backend_for(base.model).name
    if backend == "llava" and compensate:
        # its calibration runs the contrastive encoders (encode_image / encode_text) a LLaVA does not have
        raise HippError("--compensate is not available for a llava model: its calibration is contrastive")
    processor = _llava_processor(base) if backend == "llava" else None
    if reconstruct:
        check_reconstruct(reconstruct, backend, compensate, base.tokenizer, plan)
    out = check_out(out, overwrite)
    gates = plan.gates
    compensated = None
    if compensate:
        images, texts = calibration(base, calib_n, seed=1, fmnist=calib_n)
        device = next(base.model.parameters()).device
        small = compensate_bias(base.model, *gates, images=images.to(device), texts=texts.to(device))
        compensated = {"images": len(images), "texts": len(texts)}
    else:
        small = materialize(base.model, plan)  # with its visual-token budget, if it has one
    reconstructed = None
    if reconstruct:
        from .reconstruct import calibration_for, refit
        reconstructed = refit(base.model, small, calibration_for(base, reconstruct))
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
    latency = plan.meta.get("latency")
    if latency is not None:  # predicted by the query; measured here, on this machine
        from ..evaluation.profile import measure_export
        latency = {**latency, **measure_export(base.model, plan.space, small, latency)}
    config = {
        "format": PRUNED_FORMAT, "version": PRUNED_VERSION, "hipp_version": __version__, "backend": backend,
        "model_cfg": base.model_cfg, "preprocess_cfg": base.preprocess_cfg,
        "structure": struct, "num_params": num_params,
        "preference": dict(plan.preference), "meta": dict(plan.meta), "costs": costs,
        "base": {"model": base.spec, "pretrained": base.pretrained, "fingerprint": base.fingerprint},
        "compensated": compensated, "reconstructed": reconstructed, "plan": plan.to_dict(), "latency": latency,
    }
    budget = visual_tokens.installed(small)
    if budget is not None:  # load_model re-installs it: the export prunes its visual tokens itself
        config["visual_tokens"] = budget.to_dict()
    with outputs.claim(out, COMMAND, overwrite, legacy=_earlier_export), outputs.staged(out, COMMAND) as stage:
        save_tensors(stage / PRUNED_WEIGHTS_NAME, small.state_dict())
        if backend == "open_clip":  # what open_clip's local-dir tokenizer / transform read
            write_json(stage / CONFIG_NAME, {"model_cfg": base.model_cfg, "preprocess_cfg": base.preprocess_cfg})
        elif processor is not None:  # what get_processor reads: tokenizer, image processor, image token
            processor.save_pretrained(str(stage))
        elif base.tokenizer is not None:  # the transformers tokenizer files; preprocessing is in pruned_config.json
            # (a LLaVA base loaded without tokenizer files has none: the export then holds the model only)
            base.tokenizer.tokenizer.save_pretrained(str(stage))
        onnx_diffs = None
        if onnx and backend == "llava":
            size = int(small.config.vision_config.image_size)
            pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
            onnx_diffs = export_llava_onnx(small, stage, pixels)
            config["onnx"] = {"files": {"image_features": LLAVA_ONNX_FILE}, "max_abs_diff": onnx_diffs,
                              "atol": ONNX_ATOL, "outputs": "projected image features; the decoder is not exported"
                              + ("; every image token (the visual-token ranking runs in hipp.load_model's model)"
                                 if budget is not None else "")}
        elif onnx:
            images, tokens = calibration(base, 3, seed=2)
            onnx_diffs = export_onnx(small, stage, images, tokens)
            config["onnx"] = {"files": dict(ONNX_FILES), "max_abs_diff": onnx_diffs, "atol": ONNX_ATOL,
                              "outputs": "unnormalised embeddings"}
        write_json(stage / PRUNED_CONFIG_NAME, config)
        files = sorted(os.listdir(stage))
    result = summary(plan)
    result.update({"out": str(out), "files": files, "num_params": num_params, "compensated": compensated,
                   "reconstructed": reconstructed,
                   "onnx_max_abs_diff": onnx_diffs, "base_fingerprint": base.fingerprint, "latency": latency})
    return result


def check_reconstruct_count(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise HippError(f"--reconstruct takes a number of calibration inputs >= 1, not {n!r}")


def check_reconstruct(n: int, backend: str, compensate: bool, processor, plan: Plan | None = None) -> None:
    """--reconstruct N: N >= 1, a plan that keeps every visual token, a LLaVA with its processor."""
    check_reconstruct_count(n)
    if compensate:
        raise HippError("give --reconstruct or --compensate, not both")
    if backend == "llava" and processor is None:
        raise HippError("--reconstruct encodes its calibration instructions with the base folder's processor, "
                        "and this base has none")
    if plan is not None and plan.prunes_tokens:
        raise HippError("--reconstruct needs the plan to keep every visual token (the pruned and the base "
                        "model must read the same tokens)")


def _llava_processor(base):
    """The base folder's LlavaProcessor, or None when the folder has no processor files (a bare
    save_pretrained folder: the export then holds the model only, as the base did)."""
    from ..storage.checkpoint import get_processor

    folder = Path(base.spec)
    if not all((folder / name).is_file() for name in PROCESSOR_FILES):
        return None
    return get_processor(folder)


def run(args) -> int:
    """`hipp export`."""
    import json

    from ..cli.query import plan_from_args

    check_out(args.out, args.overwrite)  # before anything is loaded: a bad --out costs nothing
    if args.reconstruct:
        check_reconstruct_count(args.reconstruct)
    _, plan, base = plan_from_args(args, need_base=True)
    result = export_pruned(base, plan, args.out, onnx=args.onnx, compensate=args.compensate,
                           overwrite=args.overwrite, reconstruct=args.reconstruct)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"exported to {result['out']}: flops_ratio {result['flops_ratio']:.4f}, params_ratio "
              f"{result['params_ratio']:.4f}, {result['num_params']:,} parameters "
              f"(preference {result['preference_spec']})")
        lat = result["latency"]
        if lat and lat.get("measured_ratio") is not None:
            print(f"latency ratio: predicted {lat['predicted_ratio']:.3f}, measured {lat['measured_ratio']:.3f} "
                  f"(vs the dense materialisation, batch {lat['batch']}, {lat['measured_threads']} threads)")
        if result["onnx_max_abs_diff"]:
            diffs = ", ".join(f"{k} {v:.2e}" for k, v in result["onnx_max_abs_diff"].items())
            print(f"onnx max abs diff (onnxruntime vs torch): {diffs}")
    return 0
