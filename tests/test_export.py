"""Export: materialised folders that load alone, match the hard-gated model, ONNX, and refuse bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

import hipp
from hipp import load_model
from hipp.backends import clear_gates, describe, make_prunable, set_gates
from hipp.cli.main import main
from hipp.storage.checkpoint import CONFIG_NAME, PRUNED_CONFIG_NAME, PRUNED_WEIGHTS_NAME, get_preprocess, get_tokenizer
from hipp.controller.network import Controller
from hipp.controller.files import load_controller
from hipp.errors import HippError
from hipp.export.pruned import ONNX_FILES, export_pruned
from hipp.storage.fileio import load_tensors, save_tensors
from hipp.storage.outputs import MARKER
from hipp.query.bound import Base, load_base
from conftest import HAVE_FMNIST_TRAIN
from test_modules import embeddings, inputs, vitb32  # noqa: F401
from test_query import PREFS, assert_bad, cli, tiny_controller_dir  # noqa: F401


@pytest.fixture(scope="module")
def loaded(tiny_controller_dir):  # noqa: F811
    controller = load_controller(tiny_controller_dir)
    return controller, load_base(controller, tiny_controller_dir)


@pytest.fixture(scope="module")
def exported(tiny_controller_dir, tmp_path_factory):  # noqa: F811
    """One CLI export with ONNX: the folder every read-only test below looks at."""
    out = tmp_path_factory.mktemp("export") / "grounding"
    code = main(["export", "--controller", str(tiny_controller_dir), "--pref",
                 PREFS["empty_branches"], "--out", str(out), "--onnx", "--json"])
    assert code == 0
    return out


def gated_embeddings(base: Base, plan, x):
    set_gates(base.model, *plan.gates)
    try:
        return embeddings(base.model, *x)
    finally:
        clear_gates(base.model)


def test_hard_gated_equals_exported_for_six_preferences(loaded, tmp_path):
    """Every designed preference (dense, partial, dropped layers, empty branches, no image layer at all,
    mixed): the exported folder loaded by hipp.load_model computes the hard-gated model's embeddings,
    and its own cost (describe) is the plan's."""
    controller, base = loaded
    x = inputs(base.model, batch=3)
    for name, pref in PREFS.items():
        plan = controller.plan(pref)
        got = export_pruned(base, plan, tmp_path / name)
        small = load_model(tmp_path / name)
        for a, b in zip(embeddings(small, *x), gated_embeddings(base, plan, x)):
            assert (a - b).abs().max().item() <= 1e-4, name
        costs, own = plan.costs(), describe(small).dense_costs()
        for key in ("flops/image", "flops/text", "params/image", "params/text"):
            assert own[key] == pytest.approx(costs[key], rel=1e-9, abs=1e-6), (name, key)
        assert sum(p.numel() for p in small.parameters()) == got["num_params"] == round(costs["params"])
        direct = hipp.materialize(base.model, plan).state_dict()  # the Python API takes the Plan itself
        assert all(torch.equal(v, direct[k]) for k, v in small.state_dict().items())
    # what the list above promises to cover
    s = {k: controller.plan(p).summary() for k, p in PREFS.items()}
    assert not all(s["drop_layers"]["image"]["layers_kept"])
    assert s["empty_branches"]["text"]["heads_kept"][0] == 0 and s["empty_branches"]["image"]["channels_kept"][1] == 0


def test_a_fresh_process_loads_identical_embeddings(exported, tmp_path):
    model = load_model(exported)
    x = inputs(model, batch=2, seed=7)
    save_tensors(tmp_path / "x.safetensors", {"images": x[0], "tokens": x[1]})
    script = (  # only hipp.load_model: no controller, no base model folder needed
        "import sys, torch\n"
        "from hipp import load_model\n"
        "from hipp.storage.fileio import load_tensors, save_tensors\n"
        "m = load_model(sys.argv[1]); x = load_tensors(sys.argv[2])\n"
        "with torch.no_grad():\n"
        "    save_tensors(sys.argv[3], {'image': m.encode_image(x['images']), 'text': m.encode_text(x['tokens'])})\n")
    r = subprocess.run([sys.executable, "-c", script, str(exported), str(tmp_path / "x.safetensors"),
                        str(tmp_path / "y.safetensors")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    y = load_tensors(tmp_path / "y.safetensors")
    with torch.no_grad():
        assert torch.equal(y["image"], model.encode_image(x[0]))
        assert torch.equal(y["text"], model.encode_text(x[1]))


def test_export_folder_contents(exported, loaded):
    controller, base = loaded
    assert sorted(os.listdir(exported)) == sorted([MARKER, PRUNED_WEIGHTS_NAME, PRUNED_CONFIG_NAME, CONFIG_NAME,
                                                   *ONNX_FILES.values()])
    cfg = json.loads((exported / PRUNED_CONFIG_NAME).read_text())
    plan = controller.plan(PREFS["empty_branches"])
    assert cfg["model_cfg"] == base.model_cfg and cfg["preprocess_cfg"] == base.preprocess_cfg
    assert cfg["base"]["fingerprint"] == base.fingerprint == controller.fingerprint
    assert cfg["preference"] == pytest.approx(plan.preference)
    assert cfg["costs"]["flops_ratio"] == pytest.approx(plan.costs()["flops_ratio"])
    assert cfg["structure"]["text"][0] == {"kept": True, "heads": 0, "channels": 256}
    assert cfg["plan"]["layers"] == plan.to_dict()["layers"]
    assert max(cfg["onnx"]["max_abs_diff"].values()) <= 1e-4
    # tokenizer and preprocessing read the folder like a teacher's
    assert get_tokenizer(exported)(["a red circle"]).shape == (1, 32)
    from PIL import Image
    assert get_preprocess(exported)(Image.new("RGB", (40, 50))).shape == (3, 32, 32)


def test_onnx_encoders_match_torch(exported):
    ort = pytest.importorskip("onnxruntime")
    model = load_model(exported)
    images, tokens = inputs(model, batch=5, seed=3)  # another batch size than the traced one
    for tower, x, fn in (("image", images, model.encode_image), ("text", tokens, model.encode_text)):
        session = ort.InferenceSession(str(exported / ONNX_FILES[tower]), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {tower: x.numpy()})[0])
        with torch.no_grad():
            assert (got - fn(x)).abs().max().item() <= 1e-4


def test_eval_on_an_export(exported, capsys):
    code, out, err = cli(capsys, "eval", "--model", exported, "--data", "shapes", "--json")
    assert code == 0, err
    rep = json.loads(out)
    cfg = json.loads((exported / PRUNED_CONFIG_NAME).read_text())
    assert rep["params"] == cfg["num_params"]
    assert rep["flops"]["image"] == pytest.approx(cfg["costs"]["flops/image"])
    assert rep["flops"]["text"] == pytest.approx(cfg["costs"]["flops/text"])
    assert 0 <= rep["metrics"]["shapes/zs_mean"] <= 1 and rep["latency_ms"]["image"] > 0


def test_bound_export_and_reexport_over_a_previous_one(tiny_controller_dir, exported, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "e"
    code, text, err = cli(capsys, "export", "--controller", tiny_controller_dir, "--max-flops", "0.5", "--out", out,
                          "--onnx", "--json")
    assert code == 0, err
    got = json.loads(text)
    assert 0.48 <= got["flops_ratio"] <= 0.5 and got["meta"]["max_flops"] == 0.5
    assert json.loads((out / PRUNED_CONFIG_NAME).read_text())["meta"]["search"]["candidates"]
    # again without --onnx: allowed over a previous export, and the stale ONNX files go
    code, _, err = cli(capsys, "export", "--controller", tiny_controller_dir, "--pref", "utility=1", "--out", out)
    assert code == 0, err
    assert sorted(os.listdir(out)) == sorted([MARKER, PRUNED_WEIGHTS_NAME, PRUNED_CONFIG_NAME, CONFIG_NAME])
    assert json.loads((out / PRUNED_CONFIG_NAME).read_text())["costs"]["flops_ratio"] == 1.0
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging folder left behind


def test_compensation_changes_only_output_biases(loaded, tmp_path):
    controller, base = loaded
    plan = controller.plan(PREFS["partial"])
    plain = export_pruned(base, plan, tmp_path / "plain")
    fixed = export_pruned(base, plan, tmp_path / "fixed", compensate=True)
    assert plain["compensated"] is None and fixed["compensated"]["images"] >= 64
    a, b = load_tensors(tmp_path / "plain" / PRUNED_WEIGHTS_NAME), load_tensors(tmp_path / "fixed" / PRUNED_WEIGHTS_NAME)
    changed = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert changed and all(k.endswith(("out_proj.bias", "c_proj.bias")) for k in changed), changed
    load_model(tmp_path / "fixed")  # and it loads


def test_reconstruction_changes_only_output_projections(loaded, tmp_path):
    """A CLIP export refitted on 16 training scenes (+ 16 Fashion-MNIST images when installed): only the
    kept attention and MLP output projections move, the record says so, and the folder loads."""
    controller, base = loaded
    plan = controller.plan(PREFS["partial"])
    plain = export_pruned(base, plan, tmp_path / "plain")
    fixed = export_pruned(base, plan, tmp_path / "fixed", reconstruct=16)
    record = fixed["reconstructed"]
    assert plain["reconstructed"] is None and record["inputs"] == dict.fromkeys(("images", "texts"), 16 * (1 + HAVE_FMNIST_TRAIN)) and record["projections"] > 0
    assert json.loads((tmp_path / "fixed" / PRUNED_CONFIG_NAME).read_text())["reconstructed"] == record
    a, b = load_tensors(tmp_path / "plain" / PRUNED_WEIGHTS_NAME), load_tensors(tmp_path / "fixed" / PRUNED_WEIGHTS_NAME)
    changed = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert changed and all(k.endswith(("out_proj.weight", "out_proj.bias", "c_proj.weight", "c_proj.bias"))
                           for k in changed), changed
    load_model(tmp_path / "fixed")
    with pytest.raises(HippError, match="not both"):
        export_pruned(base, plan, tmp_path / "both", compensate=True, reconstruct=16)
    assert not (tmp_path / "both").exists()


# --- bad input: one stderr line, exit 2, nothing overwritten ---

def _copy(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.mark.parametrize("damage, needle", [
    (lambda d: (d / PRUNED_WEIGHTS_NAME).write_bytes((d / PRUNED_WEIGHTS_NAME).read_bytes()[:5000]),
     "not a readable safetensors file"),
    (lambda d: (d / PRUNED_WEIGHTS_NAME).write_bytes(b"\x07garbage" * 50), "not a readable safetensors file"),
    (lambda d: (d / PRUNED_WEIGHTS_NAME).unlink(), "missing weights file"),
    (lambda d: _edit(d, lambda c: c["structure"]["image"][0].update(heads=3)), "has shape"),
    (lambda d: _edit(d, lambda c: c["structure"]["text"][0].update(channels=200)), "has shape"),
    (lambda d: _edit(d, lambda c: c["structure"]["image"][0].update(heads=9)), "larger than the base model"),
    (lambda d: _edit(d, lambda c: c["structure"]["text"].pop()), "must list 2 text layers"),
    (lambda d: _edit(d, lambda c: c["structure"]["image"][1].update(kept=False)), "missing"),
    (lambda d: _edit(d, lambda c: c["model_cfg"].update(embed_dim=48)), "has shape"),
    (lambda d: _edit(d, lambda c: c.update(num_params=c["num_params"] + 1)), "parameters"),
    (lambda d: _edit(d, lambda c: c.update(format="other")), "not a HiPP pruned-model config"),
    (lambda d: (d / PRUNED_CONFIG_NAME).write_text("{truncated"), "not valid JSON"),
])
def test_damaged_exports_are_clear_errors(exported, tmp_path, capsys, damage, needle):
    d = _copy(exported, tmp_path / "copy")
    damage(d)
    with pytest.raises(HippError, match=needle):
        load_model(d)
    assert_bad(*cli(capsys, "eval", "--model", d, "--data", "shapes"), needle)


def _edit(d, fn):
    cfg = json.loads((d / PRUNED_CONFIG_NAME).read_text())
    fn(cfg)
    (d / PRUNED_CONFIG_NAME).write_text(json.dumps(cfg))


def test_bad_export_input_touches_nothing(tiny_controller_dir, tmp_path, capsys):  # noqa: F811
    c = ["export", "--controller", tiny_controller_dir]
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    assert_bad(*cli(capsys, *c, "--pref", "utility=1", "--out", target), "is a file")
    assert_bad(*cli(capsys, *c, "--pref", "utility=1", "--out", target / "sub"), "which is a file")
    assert target.read_text() == "keep me"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.md").write_text("mine")
    assert_bad(*cli(capsys, *c, "--pref", "utility=1", "--out", busy), "not empty and was not written by this command")
    assert os.listdir(busy) == ["notes.md"] and (busy / "notes.md").read_text() == "mine"
    for args, needle in ((["--pref", "utility=1,flops"], "mixes name=value pairs"),
                         (["--pref", "utility=x"], "not a number"),
                         (["--max-flops", "0.001"], "no plan meets"),
                         (["--max-flops", "0"], "max_flops must be a ratio")):
        assert_bad(*cli(capsys, *c, *args, "--out", tmp_path / "new"), needle)
        assert not (tmp_path / "new").exists()
    assert_bad(*cli(capsys, "export", "--controller", tiny_controller_dir, "--pref", "utility=1"), "--out")
    assert sorted(os.listdir(tmp_path)) == ["busy", "file.txt"]
    # --overwrite writes the export's files into the user's folder and keeps theirs
    code, _, err = cli(capsys, *c, "--pref", "utility=1", "--out", busy, "--overwrite")
    assert code == 0, err
    assert (busy / "notes.md").read_text() == "mine" and (busy / PRUNED_CONFIG_NAME).is_file()
    assert sorted(os.listdir(tmp_path)) == ["busy", "file.txt"]  # no lock, temp or .old folder left


def test_an_export_from_before_output_markers_is_replaced_without_overwrite(tiny_controller_dir, exported, tmp_path,
                                                                            capsys):  # noqa: F811
    old = tmp_path / "old"
    old.mkdir()
    for name in os.listdir(exported):
        if name != MARKER:
            (old / name).write_bytes((exported / name).read_bytes())
    code, _, err = cli(capsys, "export", "--controller", tiny_controller_dir, "--pref", "utility=1", "--out", old)
    assert code == 0, err
    assert sorted(os.listdir(old)) == sorted([MARKER, PRUNED_WEIGHTS_NAME, PRUNED_CONFIG_NAME, CONFIG_NAME])


def test_cli_process_reports_bad_export_in_one_line(tiny_controller_dir, tmp_path):  # noqa: F811
    target = tmp_path / "f"
    target.write_text("x")
    r = subprocess.run([sys.executable, "-m", "hipp", "export", "--controller", str(tiny_controller_dir),
                        "--pref", "utility=1", "--out", str(target)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "is a file" in r.stderr and target.read_text() == "x"


def test_vit_b_32_export_round_trip(vitb32, tmp_path):  # noqa: F811
    """The real architecture through a controller plan, the open_clip-name path for model_cfg, and a
    strict reload: two images and captions (batch 2)."""
    import copy
    model = copy.deepcopy(vitb32)
    from hipp.storage.checkpoint import fingerprint, preprocess_cfg
    import open_clip
    space = make_prunable(model, channel_group=256)
    c = Controller(space, ["utility", "flops"], hidden=8, rank=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in c.bias.values():
            b.copy_(torch.randn(b.shape, generator=g) + 0.5)  # a random mixed plan
    plan = c.plan("utility=1")
    base = Base(model, "ViT-B-32", None, open_clip.get_model_config("ViT-B-32"), preprocess_cfg(model),
                open_clip.get_tokenizer("ViT-B-32"), fingerprint(model))
    export_pruned(base, plan, tmp_path / "b32")
    small = load_model(tmp_path / "b32")
    x = inputs(model, batch=2)
    set_gates(model, *plan.gates)
    gated = embeddings(model, *x)
    clear_gates(model)
    for a, b in zip(embeddings(small, *x), gated):
        assert (a - b).abs().max().item() <= 1e-4
    assert 0.2 < plan.costs()["flops_ratio"] < 0.9
