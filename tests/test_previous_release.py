"""Files written by the release before stages, backends and tasks became data (commit b1b7e3e) load
and compute the same with this code: a model folder, a controller, a plan and an export, with the
outputs that release computed (tests/data/previous-release, made by its write_previous_release.py).
The formats did not change, so nothing is migrated: the old files are read as they are."""
import json
import shutil
from pathlib import Path

import torch

from hipp import load_controller, load_model
from hipp.backends import gated
from hipp.core.plan import Plan
from hipp.query.bound import load_base
from hipp.storage.fileio import load_tensors

OLD = Path(__file__).resolve().parent / "data" / "previous-release"
PREF = "utility=0.4,flops=0.6"


def _copy(tmp_path) -> Path:
    """A copy, so that nothing a test does (locks, markers) touches the committed files."""
    return Path(shutil.copytree(OLD, tmp_path / "old"))


def test_the_controller_gives_the_same_plan(tmp_path):
    old = _copy(tmp_path)
    controller = load_controller(old / "controller")
    plan = controller.plan(controller.preference(PREF))
    assert plan.to_dict() == json.loads((old / "plan.json").read_text())
    assert Plan.from_dict(json.loads((old / "plan.json").read_text())).mask_key() == plan.mask_key()
    assert plan.costs()["flops_ratio"] < 0.5  # the fixture prunes: equality is not trivial


def test_the_model_the_gated_plan_and_the_export_compute_the_same(tmp_path):
    old = _copy(tmp_path)
    ref = load_tensors(old / "reference.safetensors")
    controller = load_controller(old / "controller")
    base = load_base(controller, old / "controller")  # base_model "../model", fingerprint checked
    plan = controller.plan(controller.preference(PREF))
    with torch.no_grad():
        torch.testing.assert_close(base.model.encode_image(ref["images"]), ref["dense_image"], rtol=0, atol=1e-6)
        torch.testing.assert_close(base.model.encode_text(ref["tokens"]), ref["dense_text"], rtol=0, atol=1e-6)
        with gated(base.model, plan.gates):
            torch.testing.assert_close(base.model.encode_image(ref["images"]), ref["gated_image"], rtol=0, atol=1e-6)
            torch.testing.assert_close(base.model.encode_text(ref["tokens"]), ref["gated_text"], rtol=0, atol=1e-6)
        small = load_model(old / "export")
        torch.testing.assert_close(small.encode_image(ref["images"]), ref["export_image"], rtol=0, atol=1e-6)
        torch.testing.assert_close(small.encode_text(ref["tokens"]), ref["export_text"], rtol=0, atol=1e-6)
    assert not torch.allclose(ref["export_image"], ref["dense_image"])  # the export is pruned
