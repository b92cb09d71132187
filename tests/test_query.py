"""Queries: plans by preference (no VLM loaded) and by a cost bound (search + calibration ranking)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from hipp.backends import make_prunable
from hipp.storage.checkpoint import fingerprint, load_model
from hipp.cli.main import main
from hipp.controller.network import Controller
from hipp.controller.files import load_controller
from hipp.errors import HippError
from hipp.query.bound import bound_candidates, candidate_preferences, load_base, plan_for_budget, resolve_base, target_candidates
from hipp.query.ranking import CALIB_IMAGES, RANK_LOSSES, calibration, rank_losses, utility_losses, zero_shot_calibration, zero_shot_losses
from hipp.core.plan import Plan


NAMES = ["utility", "grounding", "flops", "params"]
CHANNEL_GROUP = 8
# Preferences of the designed controller and what each is built to do (see designed_controller)
PREFS = {
    "dense": "utility=1",
    "partial": "utility=1,flops=1",
    "drop_layers": "flops=1",            # image layer 0 and text layer 1 dropped
    "empty_branches": "grounding=1",     # text layer 0: no heads; image layer 1: no channels
    "no_image_layers": "params=1",       # every image layer dropped
    "mixed": "1,1,1,1",
}


def designed_controller(space, seed: int = 0) -> Controller:
    """A controller whose plans are known in advance.

    Depth-1 trunk h = GELU(10 * pref) and identity `down`, so each unit's logit is
    3 + up[u] . h: `up` says how strongly each objective's weight removes that unit. The flops
    weight removes units progressively (random strengths), image layer 0 and text layer 1 early;
    grounding empties text layer 0's heads and image layer 1's channels; params drops every image layer.
    """
    c = Controller(space, NAMES, hidden=4, rank=4, depth=1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c.trunk[0].weight.copy_(10 * torch.eye(4))
        c.trunk[0].bias.zero_()
        for tower, kind, idx, sizes in c.groups:
            key = f"{tower}_{kind}"
            c.down[key].weight.copy_(torch.eye(4))
            a = torch.zeros(sum(sizes), 4)
            a[:, 2] = -(0.2 + torch.rand(sum(sizes), generator=g))
            start = 0
            for i, size in zip(idx, sizes):
                rows, where = slice(start, start + size), (tower, space.layers[i].index)
                start += size
                if kind == "layer":
                    a[rows, 2] = -1.0 if where in (("image", 0), ("text", 1)) else -0.1
                    if tower == "image":
                        a[rows, 3] = -2.0
                if (kind, where) in (("head", ("text", 0)), ("channel", ("image", 1))):
                    a[rows, 1] = -2.0
            c.up[key].weight.copy_(a)
    return c


@pytest.fixture(scope="session")
def tiny_controller_dir(tiny_model_dir, tmp_path_factory):
    """The designed controller saved as the trainer saves one, for the tiny model."""
    model = load_model(tiny_model_dir)
    base_print = fingerprint(model)
    space = make_prunable(model, CHANNEL_GROUP)
    path = tmp_path_factory.mktemp("controller") / "ctrl"
    designed_controller(space).save(path, fingerprint=base_print,
                                    extra={"base_model": str(tiny_model_dir), "pretrained": None,
                                           "channel_group": CHANNEL_GROUP})
    return path


@pytest.fixture(scope="module")
def loaded(tiny_controller_dir):
    controller = load_controller(tiny_controller_dir)
    return controller, load_base(controller, tiny_controller_dir)


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_bad(code, out, err, needle):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert out == ""


# --- the designed controller does what the other tests rely on ---

def test_designed_controller_plans(loaded):
    controller, _ = loaded
    plans = {k: controller.plan(p).summary() for k, p in PREFS.items()}
    assert plans["dense"]["flops_ratio"] == 1.0
    assert plans["drop_layers"]["image"]["layers_kept"] == [False, True]
    assert plans["drop_layers"]["text"]["layers_kept"] == [True, False]
    assert plans["empty_branches"]["text"]["heads_kept"][0] == 0
    assert plans["empty_branches"]["image"]["channels_kept"][1] == 0
    assert plans["empty_branches"]["text"]["layers_kept"] == [True, True]
    assert plans["no_image_layers"]["image"]["layers_kept"] == [False, False]
    assert len({json.dumps(s, sort_keys=True) for s in plans.values()}) == len(PREFS)


# --- preference queries ---

def test_pref_query_json_is_the_plan_summary(tiny_controller_dir, loaded, capsys):
    controller, _ = loaded
    code, out, err = cli(capsys, "query", "--controller", tiny_controller_dir, "--pref", "utility=2,flops=2", "--json")
    assert code == 0, err
    got = json.loads(out)  # stdout is exactly one JSON object
    want = controller.plan("utility=1,flops=1").summary()
    assert got["preference"] == pytest.approx({"utility": 0.5, "grounding": 0.0, "flops": 0.5, "params": 0.0})
    assert got["preference_spec"] == "utility=0.5,grounding=0,flops=0.5,params=0"
    for key in ("flops_ratio", "params_ratio"):
        assert got[key] == pytest.approx(want[key]) and 0 < got[key] < 1
    for t in controller.space.stages:
        for key in ("layers_kept", "heads_kept", "channels_kept"):
            assert got[t][key] == want[t][key]
            assert len(got[t][key]) == 2


def test_pref_query_table(tiny_controller_dir, capsys):
    code, out, _ = cli(capsys, "query", "--controller", tiny_controller_dir, "--pref", PREFS["drop_layers"])
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert ["image", "0", "no", "0/4", "0/256"] in rows
    assert ["text", "1", "no", "0/4", "0/256"] in rows
    assert any(r[:1] == ["flops_ratio"] for r in rows) and any(r[:1] == ["params_ratio"] for r in rows)


def test_pref_query_never_loads_the_vlm(tiny_controller_dir, tmp_path, capsys):
    """What makes a preference query instant: in a fresh interpreter it imports neither open_clip nor
    transformers, and it gives the same answer when the base model's folder is gone (so it never
    read it)."""
    import shutil
    moved = tmp_path / "ctrl"
    shutil.copytree(tiny_controller_dir, moved)
    config = json.loads((moved / "controller.json").read_text())
    config["extra"]["base_model"] = str(tmp_path / "no-such-model")
    (moved / "controller.json").write_text(json.dumps(config))
    query = ["query", "--pref", "flops=1", "--json", "--controller"]
    script = (
        "import contextlib, io, json, sys\n"
        "from hipp.cli.main import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        f"    code = main({query + [str(moved)]!r})\n"
        "print(json.dumps({'code': code, 'out': out.getvalue(),\n"
        "                  'loaded': sorted({m.split('.')[0] for m in sys.modules} & {'open_clip', 'transformers'})}))\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["code"] == 0 and got["loaded"] == [], got
    code, out, _ = cli(capsys, *query, tiny_controller_dir)
    assert code == 0 and json.loads(got["out"]) == json.loads(out)


# --- bound queries ---

def test_flops_bounds_across_the_range_are_met_just_below(loaded):
    controller, base = loaded
    for bound in [0.3, 0.43, 0.55, 0.7, 0.9]:
        plan = plan_for_budget(controller, max_flops=bound, base=base, calib_n=32)  # the fit, not the ranking, is tested
        r = plan.costs()["flops_ratio"]
        assert bound - 0.02 <= r <= bound, (bound, r)
        assert plan.meta["max_flops"] == bound
        search = plan.meta["search"]
        losses = [c["loss"] for c in search["candidates"]]
        assert losses == sorted(losses) and search["loss"] == losses[0]  # the best one was chosen
        assert plan.preference == pytest.approx(controller.preference(search["candidates"][0]["preference"]),
                                                abs=1e-4)


def test_params_and_combined_bounds(loaded):
    controller, base = loaded
    # the tiny model's token embedding alone is ~94% of its parameters, so params bounds live above that
    for bound in (0.955, 0.97, 0.99):
        r = plan_for_budget(controller, max_params=bound, base=base, calib_n=32).costs()["params_ratio"]
        assert bound - 0.02 <= r <= bound
    c = plan_for_budget(controller, max_flops=0.6, max_params=0.97, base=base, calib_n=32).costs()
    assert c["flops_ratio"] <= 0.6 and c["params_ratio"] <= 0.97
    assert c["flops_ratio"] >= 0.58 or c["params_ratio"] >= 0.95  # one of the two bounds is tight


def test_the_ranking_measures_utility(loaded):
    """The calibration loss is 0 for the dense plan and grows with pruning; the search keeps the best."""
    controller, base = loaded
    calib = calibration(base, 16)
    dense, partial, heavy = (controller.plan(PREFS[k]) for k in ("dense", "partial", "drop_layers"))
    losses = utility_losses(base, [dense, partial, heavy], calib)
    assert losses[0] == pytest.approx(0.0, abs=1e-6)
    assert 0 < losses[1] and 0 < losses[2]
    zero_shot = lambda p: zero_shot_losses(base, [p], zero_shot_calibration(base))[0]  # noqa: E731
    distillation = lambda p: utility_losses(base, [p], calibration(base, CALIB_IMAGES, fmnist=CALIB_IMAGES))[0]  # noqa: E731
    for rank_by, measure in (("zero_shot", zero_shot), ("distillation", distillation),
                             ("both", lambda p: zero_shot(p) + distillation(p))):
        plan = plan_for_budget(controller, max_flops=0.5, base=base, rank_by=rank_by)
        chosen = measure(plan)  # what it ranks on, measured again
        assert plan.meta["search"]["rank_by"] == rank_by
        assert chosen == pytest.approx(plan.meta["search"]["loss"], rel=1e-5)
        assert all(chosen <= c["loss"] + 1e-9 for c in plan.meta["search"]["candidates"])
    with pytest.raises(HippError, match="unknown ranking"):
        plan_for_budget(controller, max_flops=0.5, base=base, rank_by="accuracy")


def test_the_zero_shot_loss_compares_class_distributions(loaded):
    """0 for the dense plan, > 0 when pruned, and the same KL as the materialised model gives."""
    import torch.nn.functional as F

    from hipp.evaluation.evaluate import shape_class_embeddings
    from hipp.export.slicing import materialize

    controller, base = loaded
    scenes, fmnist = zero_shot_calibration(base, 12)
    assert len(scenes) == 12 and (fmnist is None or len(fmnist) == 12)
    dense, heavy = (controller.plan(PREFS[k]) for k in ("dense", "drop_layers"))
    both = zero_shot_losses(base, [dense, heavy], (scenes, fmnist))
    assert both[0] == pytest.approx(0.0, abs=1e-6) and both[1] > 0
    shapes_only = zero_shot_losses(base, [heavy], (scenes, None))[0]

    def log_probs(m):  # by hand, on the physically smaller model
        img = F.normalize(m.encode_image(scenes), dim=-1)
        return [(m.logit_scale.exp() * img @ c.T).log_softmax(-1) for c in shape_class_embeddings(m, base.tokenizer).values()]
    with torch.no_grad():
        small = materialize(base.model, *heavy.gates).eval()
        kl = [F.kl_div(s, t, log_target=True, reduction="batchmean") for t, s in zip(log_probs(base.model), log_probs(small))]
    assert shapes_only == pytest.approx(float(sum(kl) / len(kl)), rel=1e-4)


def test_calibration_sets_can_start_further_into_fashion_mnist(loaded):
    """An offset gives the matching slice of the train images, so a second set need not overlap the first."""
    _, base = loaded
    _, first = zero_shot_calibration(base, 8)
    if first is None:
        pytest.skip("Fashion-MNIST is not installed")
    _, later = zero_shot_calibration(base, 4, fmnist_start=4)
    assert torch.equal(later, first[4:])
    images, tokens = calibration(base, 2, fmnist=4, fmnist_start=4)
    assert torch.equal(images[2:], later) and len(tokens) == 6


def test_bound_query_cli(tiny_controller_dir, capsys):
    code, out, err = cli(capsys, "query", "--controller", tiny_controller_dir, "--max-flops", "0.45", "--json")
    assert code == 0, err
    got = json.loads(out)
    assert 0.43 <= got["flops_ratio"] <= 0.45
    assert got["meta"]["max_flops"] == 0.45 and got["meta"]["search"]["candidates"]
    assert sum(got["preference"].values()) == pytest.approx(1.0)
    code, out, _ = cli(capsys, "query", "--controller", tiny_controller_dir, "--max-flops", "0.45")
    assert code == 0 and "chosen for    max_flops=0.45" in out


def test_without_a_base_model_the_smallest_offset_wins(loaded):
    controller, _ = loaded
    plan = plan_for_budget(controller, max_flops=0.5)
    assert 0.48 <= plan.costs()["flops_ratio"] <= 0.5
    offsets = [abs(c["logit_offset"]) for c in plan.meta["search"]["candidates"]]
    assert offsets[0] == min(offsets) and plan.meta["search"]["loss"] is None


def test_impossible_and_invalid_bounds(loaded, tiny_controller_dir, capsys):
    controller, base = loaded
    with pytest.raises(HippError, match=r"no plan meets max_flops=0.01: the smallest possible plan"):
        plan_for_budget(controller, max_flops=0.01, base=base)
    with pytest.raises(HippError, match="no plan meets max_params=0.5"):
        plan_for_budget(controller, max_params=0.5, base=base)
    for bad in (0, 1.5, math.nan, -0.2):
        with pytest.raises(HippError, match=r"max_flops must be a ratio in \(0, 1\]"):
            plan_for_budget(controller, max_flops=bad)
    assert plan_for_budget(controller, max_flops=1.0, base=base).costs()["flops_ratio"] == 1.0
    assert_bad(*cli(capsys, "query", "--controller", tiny_controller_dir, "--max-flops", "0.01"), "no plan meets")


@pytest.mark.parametrize("args, needle", [
    (["--pref", "utility=abc"], "not a number"),
    (["--pref", "speed=1"], "unknown objective 'speed'"),
    (["--pref", "utility=1,,flops=1"], "empty item"),
    (["--pref", "utility=-1"], "must be >= 0"),
    (["--pref", "1,2"], "2 positional values"),
    (["--pref", "flops=1", "--max-flops", "0.5"], "gives them no weight"),
    ([], "give --pref SPEC, --max-flops R, --max-params R or --max-latency R"),
    (["--max-flops", "abc"], "invalid float value"),
    (["--max-flops", "2"], r"max_flops must be a ratio in (0, 1], got 2"),
    (["--max-params", "nan"], "max_params must be a ratio"),
    (["--max-latency", "0.5", "--visual-tokens", "0.5"], "a latency bound does not price visual tokens yet"),
    (["--max-flops", "0.5", "--visual-tokens", "half"], "--visual-tokens takes shares"),
    (["--max-flops", "0.5", "--token-rule", "text"], "--token-rule ranks the tokens --visual-tokens keeps"),
    (["--max-flops", "0.5", "--visual-tokens", "0.5", "--token-rule", "text"], "ranks its visual tokens by 'cls' only"),
])
def test_bad_query_input(tiny_controller_dir, capsys, args, needle):
    assert_bad(*cli(capsys, "query", "--controller", tiny_controller_dir, *args), needle)


def test_bad_controller_and_base(tiny_controller_dir, tiny_model_dir, tmp_path, capsys):
    assert_bad(*cli(capsys, "query", "--controller", tmp_path / "nope", "--pref", "utility=1"),
               "controller folder not found")
    controller = load_controller(tiny_controller_dir)
    controller.save(tmp_path / "other", fingerprint="0123456789abcdef")  # trained for other weights
    assert_bad(*cli(capsys, "query", "--controller", tmp_path / "other", "--max-flops", "0.5"),
               "the controller was trained for 0123456789abcdef")
    controller.save(tmp_path / "nobase", extra={})
    assert_bad(*cli(capsys, "query", "--controller", tmp_path / "nobase", "--max-flops", "0.5"),
               "names no base model")
    # a process, not just main(): exit status, one stderr line, empty stdout
    r = subprocess.run([sys.executable, "-m", "hipp", "query", "--controller", str(tiny_controller_dir),
                        "--pref", "utility=1,grounding=x"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "not a number" in r.stderr


def test_base_model_resolution(tiny_model_dir, tmp_path, monkeypatch):
    controller = Controller(make_prunable(load_model(tiny_model_dir)), NAMES, hidden=4, rank=2)
    run = tmp_path / "repo" / "runs" / "c"
    run.mkdir(parents=True)
    (tmp_path / "repo" / "ckpt").symlink_to(tiny_model_dir)
    controller.extra = {"base_model": "ckpt"}  # relative to the repo root the run started from
    monkeypatch.chdir(tmp_path)
    assert resolve_base(controller, run) == str(tmp_path / "repo" / "ckpt")
    assert resolve_base(controller, run, base_model="ViT-B-32") == "ViT-B-32"
    controller.extra = {"base_model": "missing-model"}
    with pytest.raises(HippError, match="neither a model folder"):
        load_base(controller, run)


def test_candidate_preferences_cover_the_sweeps():
    prefs = candidate_preferences(NAMES, points=5)
    assert torch.allclose(prefs.sum(1), torch.ones(len(prefs), dtype=prefs.dtype))
    rows = {tuple(round(v, 6) for v in r.tolist()) for r in prefs}
    assert len(rows) == len(prefs)  # no duplicates
    for row in [(1, 0, 0, 0), (0.5, 0, 0.5, 0), (0, 0.25, 0, 0.75), (0, 0, 1, 0)]:
        assert tuple(float(v) for v in row) in rows
    assert candidate_preferences(["utility"], 5).tolist() == [[1.0]]


def test_candidates_are_distinct_plans_within_the_bound_and_the_search_ranks_them(loaded):
    controller, base = loaded
    short = bound_candidates(controller, max_flops=0.55, n_rank=2)
    cands = bound_candidates(controller, max_flops=0.55, n_rank=1000)
    keys = [c.plan.mask_key() for c in cands]
    assert len(set(keys)) == len(keys) > len(short)
    assert keys[:len(short)] == [c.plan.mask_key() for c in short]  # a longer list extends a shorter one
    assert all(c.plan.costs()["flops_ratio"] <= 0.55 for c in cands)
    for rank_by in RANK_LOSSES:
        plan = plan_for_budget(controller, max_flops=0.55, base=base, n_rank=1000, rank_by=rank_by)
        losses = rank_losses(base, [c.plan for c in cands], rank_by)[0]
        assert plan.mask_key() == keys[min(range(len(cands)), key=lambda j: (losses[j], abs(cands[j].offset), j))]


def test_search_is_deterministic(loaded):
    controller, base = loaded
    a = plan_for_budget(controller, max_flops=0.65, base=base)
    b = plan_for_budget(controller, max_flops=0.65, base=base)
    assert a == b and isinstance(a, Plan)


def test_a_controller_taking_a_flops_target_is_also_asked_for_the_bound_itself(loaded):
    controller, base = loaded
    g = torch.Generator().manual_seed(0)
    c = Controller(controller.space, NAMES, hidden=8, rank=4, depth=1, flops_target=True)
    with torch.no_grad():
        for p in c.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    prefs, targets = target_candidates(NAMES, 0.5)
    assert sorted(set(targets.tolist())) == pytest.approx([0.4, 0.45, 0.475, 0.5])
    assert bool((prefs[:, 2:] == 0).all()) and len(prefs) == 4 * 5  # utility-grounding sweep x targets
    plan = plan_for_budget(c, max_flops=0.5, base=base, n_rank=1000)  # every distinct plan is ranked
    assert 0.48 <= plan.costs()["flops_ratio"] <= 0.5
    search = plan.meta["search"]
    assert search["preferences_tried"] == len(candidate_preferences(NAMES)) + len(prefs)
    asked = {row["flops_target"] for row in search["candidates"]}
    assert None in asked and asked - {None} and asked - {None} <= set(targets.tolist())
    assert plan.meta.get("flops_target") == search["candidates"][0]["flops_target"]
    assert plan_for_budget(c, max_params=0.99, base=base).meta["search"]["preferences_tried"] == \
        len(candidate_preferences(NAMES))  # a params bound alone has no target to give
