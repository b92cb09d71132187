"""Least-squares reconstruction of a materialised LLaVA (hipp/export/reconstruct.py): an unpruned model
is its own best fit; a pruned one moves toward the dense model on inputs the fit never saw, on tiny
random transformers LLaVAs and on the embedded teacher's instructions; what it cannot do is refused."""
import pytest
import torch

from hipp import load_model
from hipp.backends import make_prunable
from hipp.core.plan import Plan
from hipp.data import words
from hipp.data.instruct import make_samples
from hipp.errors import HippError
from hipp.export.pruned import check_reconstruct
from hipp.export.reconstruct import calibration_batches, refit
from hipp.export.slicing import materialize
from hipp.storage.checkpoint import get_processor
from test_llava import logits, plans, prompts, tiny_llava

from conftest import HAVE_FMNIST_TRAIN, LLAVA_TEACHER_DIR, TEACHER_DIR
from test_query import tiny_controller_dir  # noqa: F401


def _batches(model, seeds) -> list[dict]:
    out = []
    for s in seeds:
        p = prompts(model, batch=16, seed=s)
        out.append({**p, "attention_mask": torch.ones_like(p["input_ids"])})
    return out


def _projections(model) -> list[torch.Tensor]:
    return [p.detach().clone() for n, p in model.named_parameters()
            if any(k in n for k in ("o_proj", "down_proj", "out_proj", "fc2"))]


@pytest.mark.parametrize("kind", ["llama", "llama-biases"])
def test_an_unpruned_model_keeps_its_weights(kind):
    model = tiny_llava(kind)
    space = make_prunable(model)
    n = len(space.layers)
    keep = (torch.ones(n), [torch.ones(l.num_heads) for l in space.layers],
            [torch.ones(l.num_channel_gates) for l in space.layers])
    small = materialize(model, *keep)
    before = _projections(small)
    info = refit(model, small, _batches(model, [1, 2]))
    assert info["projections"] == 2 * n
    for a, b in zip(before, _projections(small)):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("kind", ["llama", "llama-biases"])
def test_a_pruned_model_moves_toward_the_dense_one_on_unseen_inputs(kind):
    model = tiny_llava(kind)
    space = make_prunable(model)
    gates = plans(space)["partial_and_dropped"]
    plain, fitted = materialize(model, *gates), materialize(model, *gates)
    info = refit(model, fitted, _batches(model, range(1, 9)))
    kept_layers = int(gates[0].sum())
    assert info["projections"] == 2 * kept_layers and info["tokens"] > 0
    held_out = _batches(model, [50, 51])
    for batch in held_out:
        dense = logits(model, batch)
        err = lambda m: float((logits(m, batch) - dense).pow(2).mean())  # noqa: E731
        assert err(fitted) < 0.9 * err(plain)


def _answer_kl(model, dense, batch, answer) -> float:
    with torch.no_grad():
        p = dense(**batch).logits[:, :-1][answer].log_softmax(-1)
        q = model(**batch).logits[:, :-1][answer].log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_on_the_teacher_the_answers_move_toward_the_base():
    model = load_model(LLAVA_TEACHER_DIR).eval()
    processor = get_processor(LLAVA_TEACHER_DIR)
    space = make_prunable(model)
    _, heads, channels = plans(space)["partial_and_dropped"]  # every layer kept: a plan the teacher survives
    plan = Plan.from_gates(space, (torch.ones(len(space.layers)), heads, channels), preference={"utility": 1.0})
    plain, fitted = materialize(model, plan), materialize(model, plan)
    info = refit(model, fitted, calibration_batches(processor, 64))
    assert info["inputs"] == {"sequences": 64}
    enc = words.encode(processor, make_samples("val", 32, seed=0, image_size=words.image_side(processor)), train=True)
    answer = enc.pop("labels")[:, 1:] != -100
    assert _answer_kl(fitted, model, enc, answer) < 0.8 * _answer_kl(plain, model, enc, answer)


def test_what_reconstruction_cannot_do_is_one_clear_error():
    model = tiny_llava("llama")
    space = make_prunable(model)
    plan = Plan.from_gates(space, plans(space)["partial_and_dropped"], preference={"utility": 1.0})
    check_reconstruct(8, "open_clip", False, None, plan)  # a CLIP model needs no processor
    with pytest.raises(HippError, match=">= 1"):
        check_reconstruct(-3, "llava", False, object(), plan)
    with pytest.raises(HippError, match="not both"):
        check_reconstruct(8, "llava", True, object(), plan)
    with pytest.raises(HippError, match="processor"):
        check_reconstruct(8, "llava", False, None, plan)
    from hipp.backends import backend_for, visual_tokens
    small = materialize(model, plan)
    visual_tokens.install(small, visual_tokens.VisualTokens(kept=2, of=backend_for(model).image_tokens(model),
                                                            layer=0, rule="text"))
    before = _projections(small)
    with pytest.raises(HippError, match="same tokens"):
        refit(model, small, _batches(model, [1]))
    assert all(torch.equal(a, b) for a, b in zip(before, _projections(small)))  # nothing half-fitted


def _clip_base():
    from hipp.query.bound import Base, base_config
    from hipp.storage.checkpoint import fingerprint, get_tokenizer, preprocess_cfg
    spec = str(TEACHER_DIR)
    model = load_model(spec).eval()
    space = make_prunable(model, channel_group=8)
    return Base(model, spec, None, base_config(model, spec), preprocess_cfg(model), get_tokenizer(spec),
                fingerprint(model)), space


def test_a_clip_export_moves_toward_its_base_on_held_out_scenes(tmp_path):
    """The embedded CLIP teacher, a head and 40% of the channels off in every layer: image and text
    embeddings of validation scenes (never fitted on) come closer to the base's."""
    from hipp.data import shapes, to_input
    from hipp.export.reconstruct import contrastive_batches
    from hipp.query.ranking import input_size
    base, space = _clip_base()
    g = torch.Generator().manual_seed(3)
    heads = [torch.ones(l.num_heads).index_fill(0, torch.tensor([i % l.num_heads]), 0) for i, l in enumerate(space.layers)]
    channels = [(torch.rand(l.num_channel_gates, generator=g) > 0.4).float() for l in space.layers]
    plan = Plan.from_gates(space, (torch.ones(len(space.layers)), heads, channels), preference={"utility": 1.0})
    plain, fitted = materialize(base.model, plan), materialize(base.model, plan)
    info = refit(base.model, fitted, contrastive_batches(base, 64))
    assert info["projections"] == 2 * len(space.layers)
    scenes = shapes.make_scenes("val", 32, seed=5, image_size=input_size(base.preprocess_cfg))
    images, texts = to_input(scenes.images, base.preprocess_cfg), base.tokenizer(list(scenes.captions))
    with torch.no_grad():
        for encode, x in (("encode_image", images), ("encode_text", texts)):
            want = getattr(base.model, encode)(x)
            err = lambda m: float((getattr(m, encode)(x) - want).pow(2).mean())  # noqa: E731
            assert err(fitted) < 0.8 * err(plain)


def test_bench_measures_every_row_refitted(tiny_controller_dir, tmp_path, capsys):  # noqa: F811
    """`hipp bench --reconstruct N`: the same plans as without it, every row (the controller's and each
    baseline's) measured after the refit, and the refit recorded; what it cannot combine with is one line."""
    import json
    from test_query import assert_bad, cli
    args = ("bench", "--controller", tiny_controller_dir, "--budgets", "0.5", "--methods", "uniform,magnitude",
            "--test-items", 10, "--json")
    runs = {}
    for name, extra in (("plain", ()), ("refit", ("--reconstruct", 8))):
        code, out, err = cli(capsys, *args, *extra, "--out", tmp_path / name)
        assert code == 0, err
        runs[name] = json.loads(out)
    rows = {k: {r["method"]: r for r in v["results"]} for k, v in runs.items()}
    assert set(rows["refit"]) == set(rows["plain"]) == {"uniform", "magnitude", "hipp"}
    for m in rows["plain"]:
        assert rows["refit"][m]["flops_ratio"] == rows["plain"][m]["flops_ratio"]
        assert rows["refit"][m]["metrics"] != rows["plain"][m]["metrics"], m
    assert runs["plain"]["settings"]["reconstructed"] is None
    record = runs["refit"]["settings"]["reconstructed"]
    n = 8 * (1 + HAVE_FMNIST_TRAIN)  # 8 scenes and captions (+ 8 Fashion-MNIST images and class captions)
    assert record["rows"] == 3 and record["inputs"] == {"images": n, "texts": n} and record["damp"] > 0
    assert f"calibration: {n} images, {n} texts" in (tmp_path / "refit" / "bench.md").read_text()
    assert_bad(*cli(capsys, *args, "--reconstruct", 0, "--out", tmp_path / "bad"), "--reconstruct takes")
    assert_bad(*cli(capsys, *args, "--reconstruct", 8, "--recover-steps", 2, "--out", tmp_path / "bad"),
               "without --recover-steps")
    assert not (tmp_path / "bad").exists()


def _reference_refit(dense, small, batches, damp):
    """The refit as its formula reads, with nothing skipped: every projection in forward order, each fitted
    on full passes of both models over every batch (a CLIP batch simply never reaches the other tower)."""
    from hipp.export.reconstruct import _kept_branches, forward_pass
    for _, d_proj, s_proj in _kept_branches(dense, small):
        xs, ys = [], []
        hooks = [d_proj.register_forward_hook(lambda m, i, o: ys.append(o.reshape(-1, o.shape[-1]))),
                 s_proj.register_forward_hook(lambda m, i, o: xs.append(i[0].reshape(-1, i[0].shape[-1])))]
        with torch.no_grad():
            for b in batches:
                forward_pass(dense, b), forward_pass(small, b)
        for h in hooks:
            h.remove()
        x, y = torch.cat(xs).double(), torch.cat(ys).double()
        w0 = s_proj.weight.double()
        if s_proj.bias is not None:
            x, w0 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1), torch.cat([w0, s_proj.bias.double()[:, None]], 1)
        a = x.T @ x
        lam = damp * a.diagonal().mean() + 1e-12
        w = torch.linalg.solve(a + lam * torch.eye(len(a), dtype=a.dtype), (y.T @ x + lam * w0).T).T
        with torch.no_grad():
            s_proj.weight.copy_(w[:, :s_proj.in_features])
            if s_proj.bias is not None:
                s_proj.bias.copy_(w[:, -1])


@pytest.mark.parametrize("kind", ["llama-biases", "hf-clip"])
def test_the_refit_stops_each_pass_early_and_computes_the_formula(kind):
    """The refit stops each pass once the projection has run and feeds a CLIP projection its own tower's
    inputs only; the weights are those of the formula computed with every pass run to the end."""
    from test_hf_backend import designed_plans, hf_inputs, tiny_hf
    if kind == "hf-clip":
        model = tiny_hf("clip")
        space = make_prunable(model, channel_group=8)
        gates = designed_plans(space)["partial"]
        batches = [{"images": hf_inputs(model, 8, s)[0]} for s in (2, 3)] + \
                  [{"texts": hf_inputs(model, 8, s)[1]} for s in (4, 5)]
    else:
        model = tiny_llava(kind)
        space = make_prunable(model)
        gates = plans(space)["partial_and_dropped"]
        batches = _batches(model, [1, 2, 3])
    fitted, reference = materialize(model, *gates), materialize(model, *gates)
    refit(model, fitted, batches, damp=0.01)
    _reference_refit(model, reference, batches, damp=0.01)
    for (name, a), b in zip(fitted.named_parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
