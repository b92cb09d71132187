"""ONNX files of an exported model, each checked against onnxruntime before anything is published.

    CLIP-style (open_clip, transformers CLIP / SigLIP): image_encoder.onnx and text_encoder.onnx,
        encode_image / encode_text, unnormalised embeddings, dynamic batch.
    LLaVA: image_features.onnx, pixel values -> the projected image features the decoder reads in
        place of the image tokens (vision tower + feature selection + projector), dynamic batch.
        The decoder is not exported: its KV cache and generation loop stay in PyTorch.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..errors import HippError

ONNX_FILES = {"image": "image_encoder.onnx", "text": "text_encoder.onnx"}
LLAVA_ONNX_FILE = "image_features.onnx"
ONNX_ATOL = 1e-4


class _Encoder(torch.nn.Module):
    """One tower as a module with a single tensor input, the form torch.onnx.export traces."""

    def __init__(self, model, tower: str):
        super().__init__()
        self.model, self.tower = model, tower

    def forward(self, x):
        return self.model.encode_image(x) if self.tower == "image" else self.model.encode_text(x)


class ImageFeatures(torch.nn.Module):
    """A LLaVA's image path as one module: what get_image_features computes, as a batch tensor
    (transformers returns it as a list of per-image tensors, which would freeze the traced batch)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        cfg, inner = self.model.config, self.model.model
        layers = cfg.vision_feature_layer
        hidden = inner.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        picked = [hidden[i] for i in ([layers] if isinstance(layers, int) else layers)]
        if cfg.vision_feature_select_strategy == "default":
            picked = [h[:, 1:] for h in picked]  # CLIP's class token is not an image token
        return inner.multi_modal_projector(torch.cat(picked, dim=-1))


def _runtime():
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
        import onnxruntime
    except ImportError:
        raise HippError("--onnx needs the onnx and onnxruntime packages (pip install 'hipp[onnx]')") from None
    return onnxruntime


def _export_checked(module, x: torch.Tensor, path: Path, name: str, output: str, atol: float) -> float:
    """Trace `module` on two items of `x`, run all of `x` through onnxruntime (another batch size than
    the traced one, so the dynamic axis is checked too) and return the max abs difference to torch."""
    ort = _runtime()
    module = module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python control flow
        # the TorchScript-based exporter: it needs no onnxscript and handles the 0-head / 0-channel
        # branches (shape-derived zeros) with a dynamic batch
        torch.onnx.export(module, (x[:2],), str(path), dynamo=False, opset_version=17, input_names=[name],
                          output_names=[output], dynamic_axes={name: {0: "batch"}, output: {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    with torch.no_grad():
        want = module(x)
    diff = float((got - want).abs().max())
    if not diff <= atol:
        raise HippError(f"ONNX {path.stem} differs from torch by {diff:.2e} (> {atol:g}); nothing was written")
    return diff


def export_onnx(model, folder: Path, images: torch.Tensor, tokens: torch.Tensor, atol: float = ONNX_ATOL) -> dict:
    """Both encoders of a CLIP-style model; returns the max abs differences per tower."""
    return {tower: _export_checked(_Encoder(model, tower), x, folder / ONNX_FILES[tower], tower, "embedding", atol)
            for tower, x in (("image", images), ("text", tokens))}


def export_llava_onnx(model, folder: Path, pixel_values: torch.Tensor, atol: float = ONNX_ATOL) -> dict:
    """A LLaVA's image features; returns {"image_features": max abs difference}."""
    diff = _export_checked(ImageFeatures(model), pixel_values, folder / LLAVA_ONNX_FILE, "pixel_values",
                           "image_features", atol)
    return {"image_features": diff}
