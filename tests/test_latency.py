"""Latency: the fitted forms, plan latency and its incremental tracker, latency bounds in the budget
fitter and the query, rounding, the latency objective, and `hipp profile` on real (tiny) models.

Nothing here asserts a speed: timings are checked by benchmarks/latency_model.py. A synthetic profile
with known grids makes the arithmetic checkable exactly."""
import json

import pytest
import torch

from hipp.backends import make_prunable
from hipp.cli.main import main
from hipp.core.budget import Units, fit, meets, top_k, top_up
from hipp.core.latency import FORMS, LatencyModel, bilinear, check_profile, fit_grid, parse_bound, shape_key
from hipp.core.plan import Plan
from hipp.errors import HippError
from hipp.evaluation.profile import Timer, grid_plan, knots, measure_plans, measures_for, profile, random_plan
from hipp.query.rounding import check_rounding, round_to, rounded_counts
from hipp.storage.checkpoint import fingerprint, load_model
from hipp.training.objectives import ObjectiveConfig, Objectives
from tests.test_query import CHANNEL_GROUP, designed_controller


def synthetic_profile(space, form="table") -> dict:
    """Per stage one kind: time(u, c) = 1 + 2u + c/64 + (3 if u and c else 0), fixed 5 / 7 ms."""
    kinds = []
    for stage in space.stages:
        spec = space.tower_layers(stage)[0]
        units = list(range(spec.num_heads + 1))
        channels = [0, spec.mlp_hidden // 2, spec.mlp_hidden]
        ms = [[1 + 2 * u + c / 64 + (3 if u and c else 0) for c in channels] for u in units]
        kinds.append({"measure": stage, "shape": shape_key(spec), "units": units, "channels": channels, "ms": ms})
    return {"format": "hipp-latency-profile", "version": 1, "form": form, "device": "cpu (test)", "device_type": "cpu",
            "torch": torch.__version__, "threads": 1, "batch": 4,
            "measures": {s: {"stages": [s], "weight": 1.0, "fixed_ms": 5.0 + 2 * j} for j, s in enumerate(space.stages)},
            "kinds": kinds}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = load_model(tiny_model_dir)
    return model, make_prunable(model, CHANNEL_GROUP)


# --- forms and interpolation ---

def test_forms_fit_what_they_can_express():
    units, channels = [0, 1, 2, 4], [0, 8, 32]
    additive = [[u * 1.5 + (0.2 * c if c else 0) for c in channels] for u in units]
    plane = [[2 + u + 0.1 * c for c in channels] for u in units]
    assert torch.allclose(fit_grid(units, channels, additive, "additive"), torch.tensor(additive, dtype=torch.float64))
    assert torch.allclose(fit_grid(units, channels, plane, "linear"), torch.tensor(plane, dtype=torch.float64))
    noisy = [[1.0, 3.0, 2.0], [0.5, 4.0, 6.0], [2.0, 1.0, 7.0], [3.0, 3.0, 3.0]]
    for form in FORMS:
        g = fit_grid(units, channels, noisy, form)
        assert bool((g >= 0).all()) and bool((g.diff(dim=0) >= 0).all()) and bool((g.diff(dim=1) >= 0).all()), form
    with pytest.raises(HippError, match="unknown latency form"):
        fit_grid(units, channels, noisy, "cubic")


def test_bilinear_hits_knots_interpolates_and_has_gradients():
    grid = torch.tensor([[0.0, 2.0], [4.0, 10.0]], dtype=torch.float64)
    ku, kc = torch.tensor([0.0, 2.0], dtype=torch.float64), torch.tensor([0.0, 8.0], dtype=torch.float64)
    u = torch.tensor([0.0, 2.0, 1.0, 5.0], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([8.0, 0.0, 4.0, 8.0], dtype=torch.float64)
    got = bilinear(grid, ku, kc, u, c)
    assert got.tolist() == [2.0, 4.0, 4.0, 10.0]  # knots, the centre's mean, clamped beyond the grid
    got[2].backward()
    assert u.grad[2].item() == pytest.approx((4 + 10 - 0 - 2) / 2 / 2)


# --- plan latency ---

def test_plan_latency_is_fixed_plus_kept_blocks(tiny):
    _, space = tiny
    lm = LatencyModel(synthetic_profile(space), space)
    img, txt = space.tower_layers("image")[0], space.tower_layers("text")[0]
    block = lambda spec: 1 + 2 * spec.num_heads + spec.mlp_hidden / 64 + 3  # noqa: E731
    assert lm.dense_ms["image"] == pytest.approx(5 + 2 * block(img))
    assert lm.dense_ms["latency"] == pytest.approx(5 + 2 * block(img) + 7 + 2 * block(txt))
    # image layer 0 kept with 2 heads and half its channels, image layer 1 dropped, text dense
    plan = grid_plan(space, [0, 2, 3], 2, img.mlp_hidden // 2)
    plan = Plan.from_gates(space, (plan.layer_keep, plan.head_keep[:2] + list(space.all_kept()[1][2:]),
                                   plan.channel_keep[:2] + list(space.all_kept()[2][2:])))
    got = lm.predict(*plan.gates)
    assert float(got["image"]) == pytest.approx(5 + 1 + 4 + img.mlp_hidden / 2 / 64 + 3)
    assert float(got["text"]) == pytest.approx(lm.dense_ms["text"])


def test_tracker_matches_full_prediction(tiny):
    _, space = tiny
    lm = LatencyModel(synthetic_profile(space), space)
    units = Units(space, lm)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        plan = random_plan(space, g, layer_p=0.7)
        eff = torch.cat([plan.layer_keep, *plan.head_keep, *plan.channel_keep]).tolist()
        tracker = units.tracker(eff)
        assert tracker.current()["latency"] == pytest.approx(float(lm.ratios(*plan.gates)["latency"]))
        for u in torch.randperm(len(eff), generator=g).tolist()[:25]:
            if eff[u] or (units.kind[u] != "layer" and not eff[units.layer[u]]):
                continue
            predicted = tracker.after(u)
            tracker.add(u)
            eff[u] = 1.0
            exact = units.measure(units.plan(torch.tensor(eff), {}), ["latency", "latency/image", "latency/text"])
            for key, v in exact.items():
                assert predicted[key] == pytest.approx(v), key


@pytest.mark.parametrize("bound", [0.35, 0.6, 0.9])
def test_top_up_fills_a_latency_bound(tiny, bound):
    _, space = tiny
    units = Units(space, LatencyModel(synthetic_profile(space), space))
    flat = torch.randn(sum(units.sizes), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    bounds = {"latency": bound}
    found = fit(units, flat, bounds)
    mask, _ = top_up(units, flat, found.k, bounds)
    plan = units.plan(mask, {})
    got = units.measure(plan, ["latency"])["latency"]
    assert got <= bound
    eff = mask.tolist()  # nothing more fits: every unit left out would cross the bound
    tracker = units.tracker(eff)
    for u, e in enumerate(eff):
        if not e and (units.kind[u] == "layer" or eff[units.layer[u]]):
            assert tracker.after(u)["latency"] > bound - 1e-9


def test_latency_bound_needs_a_model_and_known_keys(tiny):
    _, space = tiny
    with pytest.raises(HippError, match="needs a latency profile"):
        top_up(Units(space), torch.zeros(sum(Units(space).sizes), dtype=torch.float64), 0, {"latency": 0.5})
    units = Units(space, LatencyModel(synthetic_profile(space), space))
    with pytest.raises(HippError, match="unknown latency bound"):
        units.check_keys(["latency/decode"])


def test_parse_bound():
    assert parse_bound("0.5") == 0.5
    for bad in ("fast", "-1", "nan", "0"):
        with pytest.raises(HippError):
            parse_bound(bad)
    with pytest.raises(HippError, match="needs a latency profile"):
        parse_bound("12ms")
    with pytest.raises(HippError, match="nothing to prune"):
        parse_bound("1.5")


def test_milliseconds_bound_is_a_ratio_of_the_dense_prediction(tiny):
    _, space = tiny
    lm = LatencyModel(synthetic_profile(space), space)
    assert parse_bound(f"{lm.dense_ms['latency'] / 2}ms", lm) == pytest.approx(0.5)


# --- the profile file is user input ---

@pytest.mark.parametrize("change, needle", [
    (lambda p: p.update(format="x"), "not a HiPP latency profile"),
    (lambda p: p.update(version=9), "profile version"),
    (lambda p: p.update(form="cubic"), "form must be"),
    (lambda p: p["measures"]["image"].update(fixed_ms=-1), "non-negative"),
    (lambda p: p["kinds"][0].update(units=[2, 1]), "increasing"),
    (lambda p: p["kinds"][0]["ms"].pop(), "grid"),
    (lambda p: p["kinds"][0]["ms"][0].__setitem__(0, float("nan")), "non-negative number"),
    (lambda p: p.update(batch=0), "batch"),
])
def test_bad_profiles_are_refused_in_one_line(tiny, change, needle):
    _, space = tiny
    p = synthetic_profile(space)
    change(p)
    with pytest.raises(HippError, match=needle):
        check_profile(p)


def test_profile_of_another_model_is_refused(tiny):
    _, space = tiny
    p = synthetic_profile(space)
    p["kinds"][0]["shape"]["width"] = 999
    with pytest.raises(HippError, match="made for another model"):
        LatencyModel(p, space)


# --- rounding ---

@pytest.mark.parametrize("bound", [{"flops": 0.5}, {"latency": 0.5}])
def test_rounding_keeps_multiples_and_the_bound(tiny, bound):
    _, space = tiny
    units = Units(space, LatencyModel(synthetic_profile(space), space))
    flat = torch.randn(sum(units.sizes), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    found = fit(units, flat, bound)
    mask, _ = top_up(units, flat, found.k, bound)
    rounded, added = round_to(units, flat, mask, bound, 32, 2)
    plan = units.plan(rounded, {})
    assert rounded_counts(plan, 32, 2)
    assert meets(units.measure(plan, bound), bound)
    assert not rounded_counts(units.plan(mask, {}), 32, 2) or torch.equal(rounded, mask)


def test_rounding_keeps_the_highest_keyed_units(tiny):
    _, space = tiny
    units = Units(space)
    flat = torch.arange(sum(units.sizes), dtype=torch.float64)  # later units have higher keys
    mask = top_k(flat, len(flat))  # everything kept; drop 1 head of every layer by hand
    first_head = {}
    for u, (kind, i) in enumerate(zip(units.kind, units.layer)):
        if kind == "head" and i not in first_head:
            first_head[i] = u
    for u in first_head.values():
        mask[u] = 0.0
    bound = units.measure(units.plan(mask, {}), ["flops"])  # 3 heads a layer; rounding frees room for 2 blocks
    rounded, added = round_to(units, flat, mask, bound, CHANNEL_GROUP, 2)
    plan = units.plan(rounded, {})
    assert meets(units.measure(plan, bound), bound) and added == 4
    counts = []
    for i, spec in enumerate(space.layers):
        k = len(plan.kept_heads(i))
        counts.append(k)
        assert k % 2 == 0 and plan.kept_heads(i) == list(range(spec.num_heads - k, spec.num_heads))
    assert sorted(counts) == [2, 2, 4, 4]  # the two blocks went back where keys are highest


def test_check_rounding(tiny):
    _, space = tiny
    assert check_rounding(space, None, None) is None
    assert check_rounding(space, 16, None) == (16, 1)
    with pytest.raises(HippError, match="whole channel groups"):
        check_rounding(space, 12, None)
    with pytest.raises(HippError, match="positive whole number"):
        check_rounding(space, 8, 0)


# --- the latency objective ---

def test_latency_objective_is_differentiable_and_one_when_dense(tiny):
    _, space = tiny
    lm = LatencyModel(synthetic_profile(space), space)
    objectives = Objectives(ObjectiveConfig(names=("utility", "latency")), space, lm)
    dense = objectives.costs(space.all_kept())
    assert float(dense["latency"]) == pytest.approx(1.0)
    probs = [torch.full((len(space.layers),), 0.5, dtype=torch.float64, requires_grad=True),
             [torch.full((l.num_heads,), 0.5, dtype=torch.float64, requires_grad=True) for l in space.layers],
             [torch.full((l.num_channel_gates,), 0.5, dtype=torch.float64, requires_grad=True) for l in space.layers]]
    loss = objectives.costs(probs)["latency"]
    loss.backward()
    assert 0 < loss.item() < 1
    assert float(probs[0].grad.sum()) > 0 and all(float(h.grad.sum()) > 0 for h in probs[1])
    with pytest.raises(HippError, match="go together"):
        Objectives(ObjectiveConfig(names=("utility", "latency")), space)


# --- measuring real models ---

def test_profile_measures_a_real_model(tiny, one_thread):
    model, space = tiny
    prof = profile(model, space, batch=2, repeats=1, warmup=0, validation=2, progress=False)
    check_profile(prof)
    assert set(prof["measures"]) == {"image", "text"} and prof["form"] in FORMS
    assert set(prof["validation"]) == set(FORMS)
    spec = space.layers[0]
    kind = prof["kinds"][0]
    assert kind["units"] == knots(spec.num_heads) and kind["channels"][-1] == spec.mlp_hidden
    lm = LatencyModel(prof, space)
    assert lm.dense_ms["latency"] > 0
    timer = Timer(measures_for(model, space, 2, torch.device("cpu")), torch.device("cpu"), 1, 0)
    got = measure_plans(model, space, [Plan.dense(space)], timer)[0]
    assert set(got) == {"image", "text", "dense/image", "dense/text", "ratio/image", "ratio/text"}


def test_profile_takes_a_model_as_loaded(tiny_model_dir, one_thread):
    """The README's Python use: a model straight from hipp.load_model, never made prunable."""
    import hipp
    from hipp.backends import describe

    model = hipp.load_model(tiny_model_dir)
    space = describe(model, CHANNEL_GROUP)
    prof = hipp.profile(model, space, batch=2, repeats=1, warmup=0, validation=0, progress=False)
    assert hipp.LatencyModel(prof, space).dense_ms["latency"] > 0


def test_profile_times_a_transformers_clip(hf_tiny_dir, one_thread):
    model = load_model(hf_tiny_dir)
    space = make_prunable(model, CHANNEL_GROUP)
    prof = profile(model, space, batch=2, repeats=1, warmup=0, validation=0, progress=False)
    assert set(prof["measures"]) == set(space.stages) and prof["form"] == "table"
    assert LatencyModel(prof, space).dense_ms["latency"] > 0


def test_profile_times_a_llava_prefill_and_decode(one_thread):
    from tests.test_llava import tiny_llava

    model = tiny_llava("llama")
    space = make_prunable(model, 16)
    prof = profile(model, space, batch=2, repeats=1, warmup=0, validation=1, progress=False)
    check_profile(prof)
    assert prof["measures"]["prefill"]["stages"] == ["vision", "language"]
    assert prof["measures"]["decode"]["stages"] == ["language"] and prof["measures"]["decode"]["weight"] == 8.0
    lm = LatencyModel(prof, space)
    assert lm.kinds["decode"][0] is None  # vision layers cost nothing in a decode step
    assert {k["measure"] for k in prof["kinds"]} == {"prefill", "decode"}
    # a timed decode call runs DECODE_TOKENS steps in a row, each extending the prefill's cache
    from hipp.evaluation.profile import DECODE_TOKENS, measures_for
    decode = measures_for(model, space, 2, torch.device("cpu"))["decode"]
    cache = decode.setup(model)
    prompt = cache.get_seq_length()
    calls = []
    hook = model.model.language_model.register_forward_hook(lambda *_: calls.append(1))
    cache = decode.run(model, cache)
    hook.remove()
    assert decode.per_call == len(calls) == DECODE_TOKENS > 1 and cache.get_seq_length() == prompt + DECODE_TOKENS


# --- the command line ---

@pytest.fixture(scope="module")
def latency_controller_dir(tiny_model_dir, tmp_path_factory):
    model = load_model(tiny_model_dir)
    space = make_prunable(model, CHANNEL_GROUP)
    path = tmp_path_factory.mktemp("lat") / "ctrl"
    designed_controller(space).save(path, fingerprint=fingerprint(model),
                                    extra={"base_model": str(tiny_model_dir), "pretrained": None,
                                           "channel_group": CHANNEL_GROUP})
    prof = path.parent / "profile.json"
    prof.write_text(json.dumps(synthetic_profile(space)))
    return path, prof


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_query_with_a_latency_bound(latency_controller_dir, capsys):
    path, prof = latency_controller_dir
    code, out, err = run_cli(capsys, "query", "--controller", path, "--max-latency", "0.6", "--latency-profile", prof,
                             "--round", "16", "--round-heads", "2", "--calib-images", "32", "--candidates", "3",
                             "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["meta"]["max_latency"] == 0.6 and s["meta"]["latency"]["predicted_ratio"] <= 0.6
    assert s["meta"]["round"] == {"channels": 16, "units": 2}
    for t in ("image", "text"):
        assert all(h % 2 == 0 for h in s[t]["heads_kept"]) and all(c % 16 == 0 for c in s[t]["channels_kept"])


def test_a_preference_under_a_latency_bound_keeps_its_split_and_rounds(latency_controller_dir, capsys):
    path, prof = latency_controller_dir
    code, out, err = run_cli(capsys, "query", "--controller", path, "--pref", "utility=1", "--max-latency", "0.6",
                             "--latency-profile", prof, "--round", "16", "--round-heads", "2", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["meta"]["latency"]["predicted_ratio"] <= 0.6 and s["meta"]["trade_off"]["asked"]["utility"] == 1.0
    assert s["preference"]["utility"] > 0 and s["preference"]["grounding"] == 0  # the split: utility alone
    assert s["meta"]["round"] == {"channels": 16, "units": 2}
    for t in ("image", "text"):
        assert all(h % 2 == 0 for h in s[t]["heads_kept"]) and all(c % 16 == 0 for c in s[t]["channels_kept"])


def test_export_records_predicted_and_measured_latency(latency_controller_dir, tmp_path, capsys, one_thread):
    path, prof = latency_controller_dir
    code, out, err = run_cli(capsys, "export", "--controller", path, "--pref", "flops=1", "--latency-profile", prof,
                             "--out", tmp_path / "exp", "--json")
    assert code == 0, err
    lat = json.loads((tmp_path / "exp" / "pruned_config.json").read_text())["latency"]
    assert lat["predicted_ratio"] < 1 and lat["measured_ratio"] > 0
    assert set(lat["measured_ms"]) == {"image", "text"} and lat["batch"] == 4


def test_a_calibrated_latency_bound_corrects_the_bound_by_measurement(latency_controller_dir, capsys, one_thread):
    """The synthetic profile predicts badly on purpose: each retry asks the previous bound times
    bound / measured, and the plan kept is the closest measured one that fits (or the fastest)."""
    path, prof = latency_controller_dir
    code, out, err = run_cli(capsys, "query", "--controller", path, "--max-latency", "0.5", "--latency-profile", prof,
                             "--calibrate-latency", "--calib-images", "32", "--candidates", "2", "--json")
    assert code == 0, err
    meta = json.loads(out)["meta"]
    cal, tries = meta["latency_calibration"], meta["latency_calibration"]["tries"]
    assert meta["max_latency"] == 0.5 == cal["bound"] and 1 <= len(tries) <= 3 and tries[0]["asked"] == 0.5
    for before, after in zip(tries, tries[1:]):
        assert abs(before["measured_ratio"] / 0.5 - 1) > cal["tolerance"]  # only a miss is retried
        assert after["asked"] == pytest.approx(min(1.0, before["asked"] * 0.5 / before["measured_ratio"]))
    got = [t["measured_ratio"] for t in tries]
    fits = [i for i, m in enumerate(got) if m <= 0.5 * (1 + cal["tolerance"])]
    assert cal["kept"] == (min(fits, key=lambda i: abs(got[i] - 0.5)) if fits else got.index(min(got)))
    assert meta["latency"]["predicted_ratio"] == pytest.approx(tries[cal["kept"]]["predicted_ratio"])


@pytest.mark.parametrize("args, needle", [
    (["--max-latency", "0.5"], "needs a latency profile"),
    (["--max-latency", "soon", "--latency-profile", "P"], "takes a ratio"),
    (["--max-latency", "0.5", "--latency-profile", "missing.json"], "missing file"),
    (["--pref", "flops=1", "--round", "12"], "whole channel groups"),
    (["--max-flops", "0.5", "--calibrate-latency"], "give --max-latency too"),
])
def test_query_bad_latency_input(latency_controller_dir, capsys, args, needle):
    path, prof = latency_controller_dir
    args = [str(prof) if a == "P" else a for a in args]
    code, out, err = run_cli(capsys, "query", "--controller", path, *args)
    assert code == 2 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_profile_command_refuses_bad_input_and_keeps_files(tiny_model_dir, tmp_path, capsys):
    existing = tmp_path / "p.json"
    existing.write_text("keep me")
    for args, needle in ((["--out", existing], "exists"), (["--out", tmp_path / "n.json", "--batch", "0"], "--batch"),
                         (["--out", tmp_path, "--repeats", "1"], "is a folder"),
                         (["--out", tmp_path / "n.json", "--device", "tpu"], "unknown device"),
                         (["--out", tmp_path / "n.json", "--channel-group", "0"], "--channel-group")):
        code, out, err = run_cli(capsys, "profile", "--model", tiny_model_dir, *args)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert existing.read_text() == "keep me"


def test_profile_command_writes_a_usable_profile(tiny_model_dir, tmp_path, capsys, one_thread):
    out_file = tmp_path / "prof.json"
    code, out, err = run_cli(capsys, "profile", "--model", tiny_model_dir, "--out", out_file, "--batch", "2",
                             "--repeats", "1", "--validation", "0", "--channel-group", "16", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["form"] == "table" and summary["threads"] == 1
    model = load_model(tiny_model_dir)
    space = make_prunable(model, CHANNEL_GROUP)
    prof = json.loads(out_file.read_text())
    # the grid times whole groups only, the widths a controller's plans take
    widths = {l.mlp_hidden for l in space.layers}
    assert prof["channel_group"] == 16
    assert all(c % 16 == 0 or c in widths for kind in prof["kinds"] for c in kind["channels"])
    LatencyModel(prof, space)


def test_a_controller_trained_with_latency_carries_its_profile(tiny_model_dir, tmp_path, capsys, one_thread):
    import yaml

    from hipp.config import load_config
    from hipp.controller.files import load_controller
    from hipp.training.trainer import TrainConfig, train

    model = load_model(tiny_model_dir)
    space = make_prunable(model, 16)
    prof = tmp_path / "profile.json"
    prof.write_text(json.dumps(synthetic_profile(space)))
    cfg = {"model": str(tiny_model_dir), "output": str(tmp_path / "out"), "channel_group": 16, "steps": 3,
           "pref_groups": 2, "controller": {"hidden": 16, "rank": 4},
           "data": {"batch_size": 8, "shape_fraction": 1.0, "negatives": 2},
           "objectives": {"names": ["utility", "grounding", "latency", "params"]}, "latency_profile": str(prof)}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    train(load_config(TrainConfig, tmp_path / "cfg.yaml"))
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert all(0 < row["latency"] <= 1 for row in log)
    controller = load_controller(tmp_path / "out")
    assert controller.extra["latency_profile"] == synthetic_profile(space)
    code, out, err = run_cli(capsys, "query", "--controller", tmp_path / "out", "--max-latency", "0.7",
                             "--candidates", "2", "--calib-images", "32", "--json")
    assert code == 0, err
    assert json.loads(out)["meta"]["latency"]["predicted_ratio"] <= 0.7
    del cfg["latency_profile"]  # the objective without its profile is refused when the config loads
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(HippError, match="needs latency_profile"):
        load_config(TrainConfig, tmp_path / "bad.yaml")


def test_the_bounds_summary_gives_the_seeds_mean_margin_with_its_standard_error_over_seeds():
    import importlib.util
    import statistics
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "latency_bounds", Path(__file__).resolve().parents[1] / "benchmarks" / "latency_bounds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.over_seeds([0.01]) == ""  # one seed has no spread to give
    diffs = [-0.017, 0.056, 0.004]
    se = statistics.stdev(diffs) / 3 ** 0.5
    assert mod.over_seeds(diffs) == f"; mean over 3 seeds {statistics.mean(diffs):+.4f} ± {se:.4f} (standard error over seeds)"
    assert f"{se:.4f}" == "0.0217"  # sd 0.0376 over three seeds, by hand
