"""Run with the previous release's code (commit b1b7e3e): writes a model folder, a controller and an
export in that release's formats, plus reference outputs, for tests/test_previous_release.py."""
import json, sys
from pathlib import Path

import open_clip
import torch

from hipp.checkpoint import fingerprint, load_model, save_model
from hipp.controller import Controller
from hipp.backends import make_prunable, gated
from hipp.export import export_pruned
from hipp.query import load_base
from hipp.fileio import save_tensors

out = Path(sys.argv[1])
CFG = {"embed_dim": 16,
       "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 8, "mlp_ratio": 2.0},
       "text_cfg": {"context_length": 16, "vocab_size": 300, "width": 32, "heads": 4, "layers": 2, "mlp_ratio": 2.0}}
PP = {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
torch.manual_seed(0)
model = open_clip.CLIP(**CFG).eval()
save_model(model, out / "model", CFG, PP, dtype=torch.float32)
model = load_model(out / "model")
space = make_prunable(model, 8)
torch.manual_seed(1)
ctrl = Controller(space, ["utility", "grounding", "flops", "params"], hidden=8, rank=4, depth=1)
with torch.no_grad():
    for p in ctrl.parameters():
        p.add_(3.0 * torch.randn_like(p))  # a controller whose plans prune something
ctrl.save(out / "controller", fingerprint=fingerprint(model),
          extra={"base_model": "../model", "pretrained": None, "family": "open_clip", "channel_group": 8})
pref = "utility=0.4,flops=0.6"
plan = ctrl.plan(ctrl.preference(pref))
(out / "plan.json").write_text(json.dumps(plan.to_dict()))
base = load_base(ctrl, out / "controller")
export_pruned(base, plan, out / "export")
g = torch.Generator().manual_seed(2)
images = torch.randn(3, 3, 32, 32, generator=g)
tokens = torch.randint(1, 300, (3, 16), generator=g)
with torch.no_grad():
    ref = {"images": images, "tokens": tokens,
           "dense_image": base.model.encode_image(images), "dense_text": base.model.encode_text(tokens)}
    with gated(base.model, plan.gates):
        ref["gated_image"], ref["gated_text"] = base.model.encode_image(images), base.model.encode_text(tokens)
    small = load_model(out / "export")
    ref["export_image"], ref["export_text"] = small.encode_image(images), small.encode_text(tokens)
save_tensors(out / "reference.safetensors", {k: v.contiguous() for k, v in ref.items()})
(out / "README.md").write_text(
    "Written by the release before stages became the backend's data (commit b1b7e3e) with\n"
    "`write_previous_release.py` from that commit's tree (kept in the test's docstring): a random-init\n"
    "open_clip model folder, a controller trained on nothing (random weights), the plan for\n"
    f"`{pref}` and its export, and the outputs that release computed for fixed inputs.\n")
print("written", sorted(p.name for p in out.iterdir()))
