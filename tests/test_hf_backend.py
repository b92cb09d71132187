"""transformers backend: CLIPModel and SiglipModel under the same gates, plans and exports as open_clip."""
import json
import subprocess
import sys

import pytest
import torch
import transformers

from hipp import load_model
from hipp.backends import clear_gates, describe, make_prunable, set_gates
from hipp.backends.convert import convert_folder
from hipp.backends.hf import HFBlock, HFVLM
from hipp.storage.checkpoint import PRUNED_CONFIG_NAME, fingerprint, get_tokenizer
from hipp.controller.files import load_controller
from hipp.data import shapes, to_input
from hipp.errors import HippError
from hipp.evaluation.evaluate import shape_metrics
from hipp.export.slicing import empty_model, materialize, model_structure
from conftest import TEACHER_DIR, counted_flops
from test_modules import random_gates
from test_query import PREFS, assert_bad, cli, designed_controller


def tiny_hf(kind: str, seed: int = 0) -> HFVLM:
    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                  image_size=16, patch_size=4)
    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                vocab_size=100, max_position_embeddings=8, bos_token_id=98, eos_token_id=99, pad_token_id=99)
    if kind == "clip":
        hf = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    else:
        hf = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
    return HFVLM(hf.eval(), {"size": 16, "mean": [0.5] * 3, "std": [0.5] * 3}).requires_grad_(False)


def hf_inputs(model: HFVLM, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    size, cfg = model.hf.config.vision_config.image_size, model.hf.config.text_config
    ids = torch.randint(0, cfg.eos_token_id, (batch, cfg.max_position_embeddings), generator=g)
    ids[:, -3] = cfg.eos_token_id  # an end token before some padding, as a tokenizer makes it
    ids[:, -2:] = cfg.pad_token_id
    return torch.randn(batch, 3, size, size, generator=g), ids


def embed(model, x):
    with torch.no_grad():
        return model.encode_image(x[0], normalize=True), model.encode_text(x[1], normalize=True)


def max_diff(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a, b))


def designed_plans(space, seed: int = 0) -> dict:
    """Dense, random partial, dropped layers, emptied heads and channels, no image layer, and mixed."""
    n = len(space.layers)
    ones = (torch.ones(n), [torch.ones(l.num_heads) for l in space.layers],
            [torch.ones(l.num_channel_gates) for l in space.layers])
    partial = random_gates(space, seed)
    partial[0][:] = 1
    drop = (torch.tensor([0.0, 1.0] * (n // 2)), *ones[1:])
    empty = (torch.ones(n), [h * (i % 2) for i, h in enumerate(ones[1])], [c * ((i + 1) % 2) for i, c in enumerate(ones[2])])
    image = [l.tower == "image" for l in space.layers]
    no_image = (torch.tensor([0.0 if t else 1.0 for t in image]), *partial[1:])
    return {"dense": ones, "partial": partial, "drop_layers": drop, "empty_branches": empty,
            "no_image_layers": no_image, "mixed": random_gates(space, seed + 1)}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_gates_at_one_change_nothing(kind):
    model = tiny_hf(kind)
    x = hf_inputs(model)
    before, keys = embed(model, x), list(model.state_dict())
    space = make_prunable(model, channel_group=8)
    assert all(isinstance(b, HFBlock) for b in model.hf.vision_model.encoder.layers)
    assert list(model.state_dict()) == keys  # transformers' names and order: checkpoints load unchanged
    set_gates(model, *designed_plans(space)["dense"])
    assert max_diff(embed(model, x), before) == 0.0
    clear_gates(model)
    assert max_diff(embed(model, x), before) == 0.0


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hard_gated_equals_materialised(kind):
    """Six plans, both towers: the smaller model computes the hard-gated one, costs what the plan says
    (analytic FLOPs equal torch's flop counter, SigLIP's pooling head included) and rebuilds from its
    structure for a strict load."""
    model = tiny_hf(kind)
    x = hf_inputs(model)
    space = make_prunable(model, channel_group=8)
    for name, plan in designed_plans(space).items():
        set_gates(model, *plan)
        want = embed(model, x)
        clear_gates(model)
        small = materialize(model, *plan)
        assert max_diff(embed(small, x), want) <= 1e-4, name
        costs, own = space.costs(*plan), describe(small).dense_costs()
        for tower, run in (("image", lambda m: m.encode_image(x[0][:1])), ("text", lambda m: m.encode_text(x[1][:1]))):
            with torch.no_grad():
                counted = counted_flops(run, small)
            assert counted == own[f"flops/{tower}"] == pytest.approx(float(costs[f"flops/{tower}"]))
        assert sum(p.numel() for p in small.parameters()) == pytest.approx(
            float(costs["params/image"] + costs["params/text"]))
        rebuilt = empty_model(model.hf.config.to_dict(), model_structure(small), "hf")
        rebuilt.load_state_dict(small.state_dict(), strict=True)
        assert max_diff(embed(rebuilt.eval(), x), want) <= 1e-4, name


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_reconstruction_refits_transformers_towers(kind):
    """The refit through transformers' classes: a dense plan keeps its weights; a partial one moves both
    towers' embeddings toward the base's on inputs it was not fitted on."""
    from hipp.export.reconstruct import refit
    model = tiny_hf(kind)
    space = make_prunable(model, channel_group=8)
    batches = []
    for s in range(2, 10):
        images, ids = hf_inputs(model, batch=8, seed=s)
        batches += [{"images": images}, {"texts": ids}]
    plans = designed_plans(space)
    dense = materialize(model, *plans["dense"])
    before = [p.clone() for p in dense.parameters()]
    assert refit(model, dense, batches)["projections"] == 2 * len(space.layers)
    assert max_diff(before, list(dense.parameters())) <= 1e-3
    partial = plans["partial"]
    plain, fitted = materialize(model, *partial), materialize(model, *partial)
    info = refit(model, fitted, batches)
    assert 0 < info["projections"] <= 2 * len(space.layers) and info["inputs"] == {"images": 64, "texts": 64}
    held_out = hf_inputs(model, batch=16, seed=50)
    want = embed(model, held_out)
    for i in (0, 1):  # image, text
        err = lambda m: float((embed(m, held_out)[i] - want[i]).pow(2).mean())  # noqa: E731
        assert err(fitted) < 0.8 * err(plain), (kind, i)


@pytest.fixture(scope="module")
def converted_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "teacher-hf"
    convert_folder(TEACHER_DIR, out)
    return out


def test_converted_teacher_computes_the_open_clip_teacher(converted_teacher):
    """Same embeddings (each with its own tokenizer) and the same shape metrics to 1e-3."""
    oc, hf = load_model(TEACHER_DIR), load_model(converted_teacher)
    assert isinstance(hf, HFVLM) and sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in oc.parameters())
    scenes = shapes.make_scenes("test", 16, image_size=64)
    pp = hf.preprocess_cfg
    tok_oc, tok_hf = get_tokenizer(TEACHER_DIR), get_tokenizer(converted_teacher)
    a = embed(oc, (to_input(scenes.images, pp), tok_oc(scenes.captions)))
    b = embed(hf, (to_input(scenes.images, pp), tok_hf(scenes.captions)))
    assert max_diff(a, b) <= 1e-5
    m_oc = shape_metrics(oc, tok_oc, pp, n=150)
    m_hf = shape_metrics(hf, tok_hf, pp, n=150)
    assert all(abs(m_oc[k] - m_hf[k]) <= 1e-3 for k in m_oc), (m_oc, m_hf)


def test_converted_teacher_materialises_exactly(converted_teacher):
    model = load_model(converted_teacher)
    pp, tok = model.preprocess_cfg, get_tokenizer(converted_teacher)
    scenes = shapes.make_scenes("val", 4, image_size=64)
    x = (to_input(scenes.images, pp), tok(scenes.captions))
    space = make_prunable(model, channel_group=8)
    for seed in range(5):
        plan = random_gates(space, seed)
        set_gates(model, *plan)
        want = embed(model, x)
        clear_gates(model)
        assert max_diff(embed(materialize(model, *plan), x), want) <= 1e-4, seed


# --- the whole path through the CLI on a converted tiny model ---

@pytest.fixture(scope="module")
def hf_controller_dir(hf_tiny_dir, tmp_path_factory):
    model = load_model(hf_tiny_dir)
    base_print = fingerprint(model)
    space = make_prunable(model, 16)
    path = tmp_path_factory.mktemp("hf-controller") / "ctrl"
    designed_controller(space).save(path, fingerprint=base_print,
                                    extra={"base_model": str(hf_tiny_dir), "family": "clip", "channel_group": 16})
    return path


def test_export_loads_alone_in_a_fresh_process_with_onnx(hf_controller_dir, tmp_path, capsys):
    out = tmp_path / "export"
    code, stdout, err = cli(capsys, "export", "--controller", hf_controller_dir, "--pref", PREFS["empty_branches"],
                            "--out", out, "--onnx", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert max(result["onnx_max_abs_diff"].values()) <= 1e-4
    config = json.loads((out / PRUNED_CONFIG_NAME).read_text())
    assert config["backend"] == "hf" and config["model_cfg"]["model_type"] == "clip"
    small = load_model(out)
    assert isinstance(small, HFVLM)
    tok = get_tokenizer(out)
    scenes = shapes.make_scenes("val", 3, image_size=32)
    x = (to_input(scenes.images, small.preprocess_cfg), tok(scenes.captions))
    here = [e.tolist() for e in embed(small, x)]
    code = ("import json, sys, torch; from hipp import load_model, get_tokenizer; from hipp.data import shapes, to_input\n"
            f"m = load_model({str(out)!r}); t = get_tokenizer({str(out)!r}); s = shapes.make_scenes('val', 3, image_size=32)\n"
            "with torch.no_grad():\n"
            "    e = (m.encode_image(to_input(s.images, m.preprocess_cfg), normalize=True), "
            "m.encode_text(t(s.captions), normalize=True))\n"
            "print(json.dumps([x.tolist() for x in e]))")
    there = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert there == here  # bit-identical


def test_train_query_export_through_the_hf_backend(hf_tiny_dir, tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model: {hf_tiny_dir}\nfamily: clip\noutput: {tmp_path / 'ctrl'}\nchannel_group: 16\n"
                   "steps: 3\nsave_every: 3\ndata: {batch_size: 4, shape_fraction: 0.5, negatives: 1}\n")
    code, _, err = cli(capsys, "train", "--config", cfg)
    assert code == 0, err
    assert load_controller(tmp_path / "ctrl").extra["family"] == "clip"
    code, stdout, err = cli(capsys, "query", "--controller", tmp_path / "ctrl", "--max-flops", "0.6", "--json")
    assert code == 0, err
    assert json.loads(stdout)["flops_ratio"] <= 0.6


def test_bad_hf_input(hf_tiny_dir, tmp_path, capsys):
    siglip = tmp_path / "siglip"
    tiny_hf("siglip").hf.save_pretrained(siglip)
    capsys.readouterr()  # transformers' own save progress
    with pytest.raises(HippError, match="is a siglip checkpoint, but clip was asked for"):
        load_model(siglip, expect="clip")
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model: {siglip}\nfamily: clip\noutput: {tmp_path / 'ctrl'}\n")
    assert_bad(*cli(capsys, "train", "--config", cfg), "siglip checkpoint, but clip was asked for")
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert_bad(*cli(capsys, "eval", "--model", neither), "HiPP prunes clip and siglip")
    (neither / "config.json").unlink()
    assert_bad(*cli(capsys, "eval", "--model", neither), "not a model folder")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in hf_tiny_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    raw = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    assert_bad(*cli(capsys, "eval", "--model", broken), "cannot load the clip weights")
    assert_bad(*cli(capsys, "convert", "--model", hf_tiny_dir, "--out", tmp_path / "x"), "not an open_clip model folder")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_eager_attention_and_per_sample_gates(kind):
    """With transformers' eager attention the gated model still equals the original (CLIP text stays
    causal), and a gate with a leading batch dimension gives each sample its own sub-model."""
    model = tiny_hf(kind)
    model.hf.set_attn_implementation("eager")
    x = hf_inputs(model)
    want = embed(model, x)
    space = make_prunable(model, channel_group=8)
    assert max_diff(embed(model, x), want) == pytest.approx(0.0, abs=1e-6)
    plans = [random_gates(space, seed) for seed in range(3)]
    batched = (torch.stack([p[0] for p in plans]),
               [torch.stack([p[1][i] for p in plans]) for i in range(len(space.layers))],
               [torch.stack([p[2][i] for p in plans]) for i in range(len(space.layers))])
    set_gates(model, *batched)
    together = embed(model, x)
    for j, plan in enumerate(plans):
        set_gates(model, *plan)
        alone = embed(model, (x[0][j:j + 1], x[1][j:j + 1]))
        assert max_diff([t[j:j + 1] for t in together], alone) <= 1e-5
    clear_gates(model)


def test_conversion_refuses_what_transformers_clip_cannot_express(tmp_path, capsys):
    from conftest import TINY_CFG, TINY_PP
    import open_clip
    from hipp.storage.checkpoint import save_model

    cfg = {**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "ls_init_value": 0.1}}
    save_model(open_clip.CLIP(**cfg), tmp_path / "ls", cfg, TINY_PP, dtype=torch.float32)
    assert_bad(*cli(capsys, "convert", "--model", tmp_path / "ls", "--out", tmp_path / "out"), "ls_init_value=0.1")
    cfg = {**TINY_CFG, "init_logit_bias": -10.0}
    save_model(open_clip.CLIP(**cfg), tmp_path / "bias", cfg, TINY_PP, dtype=torch.float32)
    assert_bad(*cli(capsys, "convert", "--model", tmp_path / "bias", "--out", tmp_path / "out"), "init_logit_bias")
    assert not (tmp_path / "out").exists()
