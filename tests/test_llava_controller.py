"""A controller for a generative VLM: its objectives (answer-token KL, agreement with the teacher's
yes / no), training on the embedded LLaVA teacher in one process and in two, and the plans a trained
controller answers with (a preference, a FLOPs bound) exported as a model that generates."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hipp.cli.main import main
from hipp.backends import gated
from hipp.errors import HippError
from hipp.training.objectives import answer_kl, decision_loss
from test_query import assert_bad, cli
from test_trainer import LAUNCHED, free_port

from conftest import LLAVA_TEACHER_DIR

CONFIG = {"model": str(LLAVA_TEACHER_DIR), "task": "instruct", "channel_group": 64, "seed": 0, "steps": 2,
          "pref_groups": 1, "save_every": 2, "lr": 1.0e-2, "controller": {"hidden": 16, "rank": 4},
          "data": {"batch_size": 10}}


def write_config(tmp_path, **over) -> str:
    path = tmp_path / "llava.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "output": str(tmp_path / "out"), **over}))
    return str(path)


def test_answer_kl_is_zero_at_the_teacher_and_grows_with_the_change():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(7, 50, generator=g)
    assert float(answer_kl(t, t)) == pytest.approx(0.0, abs=1e-7)
    near, far = answer_kl(t, t + 0.1 * torch.randn(7, 50, generator=g)), answer_kl(t, torch.zeros(7, 50))
    assert 0 < float(near) < float(far)
    assert float(answer_kl(torch.tensor([[100.0, 0.0]]), torch.tensor([[0.0, 100.0]]))) == pytest.approx(100 / math.log(2))


def test_decision_loss_keeps_the_teachers_answer_and_its_margin():
    teacher = torch.tensor([2.0, -1.0, 3.0])  # yes, no, yes
    assert float(decision_loss(teacher, teacher)) == pytest.approx(0.0)
    assert float(decision_loss(teacher, 2 * teacher)) == pytest.approx(0.0)  # firmer costs nothing
    assert float(decision_loss(teacher, torch.zeros(3))) == pytest.approx(1.0)  # undecided: all of it lost
    assert float(decision_loss(teacher, -teacher)) == pytest.approx(2.0)  # every answer flipped
    empty = torch.zeros(0, requires_grad=True)
    loss = decision_loss(empty.detach(), empty)
    assert float(loss.detach()) == 0.0 and loss.requires_grad  # a batch without existence questions


def test_decision_loss_against_every_token_counts_a_third_token_taking_the_answer():
    # log-odds of (yes, no) against every other token: the teacher says yes, no, yes
    teacher = torch.tensor([[3.0, -4.0], [-5.0, 2.0], [1.0, -3.0]])
    assert float(decision_loss(teacher, teacher)) == pytest.approx(0.0)
    assert float(decision_loss(teacher, teacher + 1.0)) == pytest.approx(0.0)  # firmer costs nothing
    undecided = torch.tensor([[0.0, -4.0], [-5.0, 0.0], [0.0, -3.0]])  # the teacher's answer at even odds
    assert float(decision_loss(teacher, undecided)) == pytest.approx(1.0)
    # yes still beats no by the teacher's margin, but a third token now takes the answer
    drowned = torch.tensor([[-2.0, -9.0], [-9.0, -2.0], [-2.0, -6.0]])
    assert float(decision_loss(teacher, drowned)) == pytest.approx((5 + 4 + 3) / 6)
    empty = torch.zeros(0, 2, requires_grad=True)
    assert float(decision_loss(empty.detach(), empty).detach()) == 0.0


def test_decision_loss_read_as_odds_weighs_close_calls_over_firm_answers():
    teacher = torch.tensor([8.0, -8.0, 1.0])  # two firm answers, one close call
    assert float(decision_loss(teacher, teacher, "odds")) == pytest.approx(0.0, abs=1e-7)
    # each question losing 1 of its margin: the hinge charges the firm answers as much as the close call,
    # the odds charge the close call, which is what flips an answer
    student = (teacher - torch.sign(teacher)).requires_grad_()
    decision_loss(teacher, student, "odds").backward()
    firm, close = student.grad[:2].abs(), student.grad[2].abs()
    assert bool((close > 20 * firm).all())
    hinge = student.detach().clone().requires_grad_()
    decision_loss(teacher, hinge, "hinge").backward()
    assert float(hinge.grad.abs().max() - hinge.grad.abs().min()) == pytest.approx(0.0)
    flipped = decision_loss(teacher, -teacher, "odds")
    assert float(flipped) > float(decision_loss(teacher, torch.zeros(3), "odds")) > 0
    assert float(decision_loss(teacher, -teacher, "squared")) == pytest.approx(4.0)
    # against every token the odds read the teacher's answer's log-odds, whichever it is
    pair = torch.tensor([[3.0, -4.0], [-5.0, 2.0]])
    assert float(decision_loss(pair, pair, "odds")) == pytest.approx(0.0, abs=1e-7)
    other = torch.tensor([[3.0, 0.0], [0.0, 2.0]])  # only the answer not given moved: nothing lost
    assert float(decision_loss(pair, other, "odds")) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(HippError, match="grounding mode 'maybe'"):
        decision_loss(teacher, teacher, "maybe")


def test_balanced_decision_loss_weighs_the_teachers_yes_answers_as_much_as_its_no_answers():
    teacher = torch.tensor([2.0, -8.0, 3.0, -9.0])  # the no answers are the firmer, as on the LLaVA teacher
    lose_yes = torch.tensor([0.0, -8.0, 3.0, -9.0])  # the first yes undecided
    lose_no = torch.tensor([2.0, -6.0, 3.0, -9.0])  # the first no loses as much margin
    assert float(decision_loss(teacher, lose_yes)) == pytest.approx(float(decision_loss(teacher, lose_no)))
    assert float(decision_loss(teacher, lose_yes, "balanced")) == pytest.approx(0.5 * 2 / 5)
    assert float(decision_loss(teacher, lose_no, "balanced")) == pytest.approx(0.5 * 2 / 17)
    assert float(decision_loss(teacher, 2 * teacher, "balanced")) == pytest.approx(0.0)
    assert float(decision_loss(teacher, -teacher, "balanced")) == pytest.approx(2.0)
    only_yes = torch.tensor([2.0, 3.0])  # a batch whose teacher says one answer: the plain hinge
    assert float(decision_loss(only_yes, torch.zeros(2), "balanced")) == pytest.approx(1.0)
    pair = torch.tensor([[3.0, -4.0], [-5.0, 2.0], [1.0, -3.0]])  # against every token: yes, no, yes
    drowned = torch.tensor([[-2.0, -9.0], [-9.0, -2.0], [-2.0, -6.0]])
    assert float(decision_loss(pair, drowned, "balanced")) == pytest.approx(0.5 * (5 + 3) / 4 + 0.5 * 4 / 2)


def test_balanced_grounding_is_refused_for_a_contrastive_model(tmp_path, capsys):
    from hipp.training.objectives import Embeddings, grounding_loss
    e = Embeddings(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(HippError, match="no such sides"):
        grounding_loss(e, e, mode="balanced")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "unused", "objectives": {"grounding_mode": "balanced"}}))
    assert_bad(*cli(capsys, "train", "--config", path), "grounding_mode balanced")


def test_the_distiller_reads_its_grounding_margins_by_the_configured_mode():
    from hipp.backends import make_prunable
    from hipp.data.instruct import make_samples
    from hipp.storage.checkpoint import get_processor, load_model
    from hipp.tasks.instruct import InstructBatch
    from hipp.training.generative import GenerativeDistiller
    from hipp.training.objectives import ObjectiveConfig, Objectives
    model, processor = load_model(str(LLAVA_TEACHER_DIR)).eval(), get_processor(str(LLAVA_TEACHER_DIR))
    space = make_prunable(model, channel_group=64)
    heads = [torch.ones(l.num_heads) for l in space.layers]
    for h in heads[1::2]:
        h[0] = 0  # one head gone in every other layer: the yes / no margins move
    gates = (torch.ones(len(space.layers)), heads, [torch.ones(l.num_channel_gates) for l in space.layers])
    batch = InstructBatch(make_samples("train", 20))
    got = {}
    for mode in ("hinge", "odds", "balanced"):
        d = GenerativeDistiller(model, Objectives(ObjectiveConfig(grounding_mode=mode), space), processor, "cpu")
        inputs = d.inputs(batch)
        teacher = d.teacher(inputs, batch)
        with torch.no_grad():
            got[mode] = float(d.quality(gates, inputs, teacher)["grounding"])
            with gated(model, gates):
                student = d.forward(inputs)[1]
        assert got[mode] == pytest.approx(float(decision_loss(teacher[1], student, mode)), rel=1e-5)
    assert len(set(got.values())) == 3 and min(got.values()) > 0


def test_every_token_margins_are_the_log_odds_of_yes_and_of_no():
    from hipp.data.instruct import make_samples
    from hipp.storage.checkpoint import get_processor, load_model
    from hipp.tasks.instruct import InstructBatch
    from hipp.training.generative import GenerativeDistiller
    from hipp.training.objectives import ObjectiveConfig, Objectives
    model, processor = load_model(str(LLAVA_TEACHER_DIR)).eval(), get_processor(str(LLAVA_TEACHER_DIR))
    batch = InstructBatch(make_samples("train", 10))
    got = {}
    for margin in ("yes-no", "every-token"):
        d = GenerativeDistiller(model, Objectives(ObjectiveConfig(existence_margin=margin), None), processor, "cpu")
        with torch.no_grad():
            got[margin] = d.forward(d.inputs(batch))[1]
    pair = got["every-token"]
    assert pair.shape == (3, 2)
    p_yes, p_no = torch.sigmoid(pair[:, 0]), torch.sigmoid(pair[:, 1])  # log-odds back to probabilities
    assert bool((p_yes + p_no <= 1 + 1e-5).all())
    torch.testing.assert_close(torch.log(p_yes) - torch.log(p_no), got["yes-no"], rtol=1e-4, atol=1e-4)


def test_utility_can_leave_existence_answers_to_grounding():
    from hipp.data.instruct import make_samples
    from hipp.data.words import IGNORE, encode
    from hipp.storage.checkpoint import get_processor, load_model
    from hipp.tasks.instruct import InstructBatch
    from hipp.training.generative import GenerativeDistiller
    from hipp.training.objectives import ObjectiveConfig, Objectives
    model, processor = load_model(str(LLAVA_TEACHER_DIR)).eval(), get_processor(str(LLAVA_TEACHER_DIR))
    batch = InstructBatch(make_samples("train", 10))
    labels = encode(processor, batch.samples, train=True)["labels"][:, 1:] != IGNORE
    pope = torch.tensor([s.kind.startswith("pope/") for s in batch.samples])
    assert int(pope.sum()) == 3
    got = {}
    for flag in (True, False):
        d = GenerativeDistiller(model, Objectives(ObjectiveConfig(utility_existence=flag), None), processor, "cpu")
        with torch.no_grad():
            got[flag] = d.forward(d.inputs(batch))
    (every, every_margin), (some, some_margin) = got[True], got[False]
    assert len(every) == int(labels.sum()) and len(some) == int(labels[~pope].sum()) < len(every)
    not_pope = (~pope)[:, None].expand_as(labels)[labels]  # of every answer token, those utility keeps
    torch.testing.assert_close(some, every[not_pope])  # the same logits, the existence answers' left out
    assert some_margin.shape == (3,)  # grounding reads the existence questions either way
    torch.testing.assert_close(some_margin, every_margin)


@pytest.mark.parametrize("setting,value", [("utility_existence", False), ("existence_margin", "every-token")])
def test_existence_settings_are_refused_for_a_contrastive_task(tmp_path, capsys, setting, value):
    path = tmp_path / "clip.yaml"
    path.write_text(yaml.safe_dump({"model": "unused", "objectives": {setting: value}}))
    assert_bad(*cli(capsys, "train", "--config", path), setting)


def test_an_unknown_existence_margin_is_one_clear_line(tmp_path, capsys):
    path = tmp_path / "llava.yaml"
    path.write_text(yaml.safe_dump({"model": "unused", "objectives": {"existence_margin": "maybe"}}))
    assert_bad(*cli(capsys, "train", "--config", path), "existence_margin 'maybe'")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llava-ctrl")
    assert main(["train", "--config", write_config(tmp)]) == 0
    return tmp / "out"


def test_training_logs_every_objective_and_plans_both_stages(trained, capsys):
    import json
    rows = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r) >= {"utility", "grounding", "flops", "params"} and all(math.isfinite(r[k]) for k in r)
        assert 0 <= r["utility"] and 0 <= r["grounding"] and 0 < r["flops"] <= 1
    code, out, err = cli(capsys, "query", "--controller", trained, "--pref", "utility=0.2,flops=0.8", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert {"vision", "language"} <= set(plan) and 0 < plan["flops_ratio"] <= 1


def test_answer_disagreement_is_zero_for_the_dense_plan_and_grows_as_the_language_model_goes(trained):
    from hipp.controller.files import load_controller
    from hipp.core.plan import Plan
    from hipp.query.bound import load_base
    from hipp.query.ranking import answer_disagreement

    controller = load_controller(trained)
    base = load_base(controller, trained)
    space = controller.space
    dense = Plan.from_gates(space, (torch.ones(len(space.layers)), [torch.ones(l.num_heads) for l in space.layers],
                                    [torch.ones(l.num_channel_gates) for l in space.layers]), {})
    no_language = Plan.from_gates(space, (torch.tensor([float(l.tower != "language") for l in space.layers]),
                                          [torch.ones(l.num_heads) for l in space.layers],
                                          [torch.ones(l.num_channel_gates) for l in space.layers]), {})
    dense_share, gone_share = answer_disagreement(base, [dense, no_language], 20)  # 2 of each kind
    assert dense_share == 0.0 and gone_share > 0.5
    # read by a quality split: the yes / no answers (6 of the 20) and the others (14) weighed apart
    last = max(i for i, l in enumerate(space.layers) if l.tower == "language")
    one_gone = Plan.from_gates(space, (torch.tensor([float(i != last) for i in range(len(space.layers))]),
                                       [torch.ones(l.num_heads) for l in space.layers],
                                       [torch.ones(l.num_channel_gates) for l in space.layers]), {})
    plans = [dense, one_gone, no_language]
    share, others, yes_no = (answer_disagreement(base, plans, 20, existence_weight=e) for e in (None, 0.0, 1.0))
    assert all(abs(0.3 * y + 0.7 * o - a) < 1e-12 for a, o, y in zip(share, others, yes_no))
    assert others[0] == yes_no[0] == 0.0 and min(others[2], yes_no[2]) > 0.5


def test_a_preference_under_a_bound_polishes_on_its_own_split(trained, capsys):
    import json

    from hipp.baselines.fixed_budget import GateTraining
    from hipp.controller.files import load_controller
    from hipp.query.polish import SPLIT, on_its_split, plan_logits
    from hipp.query.trade_off import own_logits, plan_for_preference

    controller = load_controller(trained)
    scale = {"utility": 0.3, "grounding": 1.0}  # the shipped recipe's: the split is read through them
    controller.extra["train_config"].setdefault("objectives", {})["scale"] = scale
    plan = plan_for_preference(controller, controller.preference("utility=1,grounding=1"), max_flops=0.5)
    u, g = (plan.preference[n] / scale[n] for n in ("utility", "grounding"))
    split = on_its_split(controller, plan, GateTraining(temperature_start=0.45, lr=0.017))  # neither SPLIT's
    assert abs(split.utility_weight - u / (u + g)) < 1e-12 and abs(split.grounding_weight - g / (u + g)) < 1e-12
    assert (split.grounding_mode, split.utility_existence) == (SPLIT["grounding_mode"], SPLIT["utility_existence"])
    assert (split.temperature_start, split.lr) == (SPLIT["temperature_start"], SPLIT["lr"])  # how far it may move
    other = on_its_split(controller, plan, GateTraining(utility_existence=SPLIT["utility_existence"]),
                         {"grounding_mode": "odds", "utility_existence": not SPLIT["utility_existence"]})
    assert (other.grounding_mode, other.utility_existence) == ("odds", not SPLIT["utility_existence"])
    assert other.utility_weight == split.utility_weight
    assert other.existence_margin == "yes-no"  # the controller's own margin where the split is silent
    assert split.existence_margin == SPLIT["existence_margin"] == "every-token"  # else the split's
    only_grounding = plan_for_preference(controller, controller.preference("grounding=1"), max_flops=0.5)
    floored = on_its_split(controller, only_grounding, GateTraining(), {**SPLIT, "utility_floor": 0.25})
    assert (floored.utility_weight, floored.grounding_weight) == (0.25, 0.75)  # utility keeps its floor
    above = on_its_split(controller, plan, GateTraining(), {**SPLIT, "utility_floor": 0.25})
    assert above.utility_weight == split.utility_weight > 0.25  # a share above the floor is the split's own
    raw = on_its_split(controller, plan, GateTraining(), {**SPLIT, "scaled": False})  # the weights as given
    pu, pg = plan.preference["utility"], plan.preference["grounding"]
    assert abs(raw.utility_weight - pu / (pu + pg)) < 1e-12 and abs(raw.utility_weight - split.utility_weight) > 0.1
    mixed = on_its_split(controller, plan, GateTraining(), {**SPLIT, "batch_follows_split": True})
    assert mixed.existence_share == pytest.approx(split.grounding_weight)  # the batch's share is the loss's
    assert on_its_split(controller, plan, GateTraining(), {**SPLIT, "batch_follows_split": False}).existence_share is None
    with pytest.raises(HippError, match="utility floor"):
        on_its_split(controller, plan, GateTraining(), {**SPLIT, "utility_floor": 1.0})
    units = own_logits(controller, plan.preference, 0.5)[0]  # the polish starts where the plan stands:
    start, kept = units.flat(plan_logits(controller, plan)), units.flat(plan.gates)  # its units, bar the top-up
    assert (start > 0).sum() >= 1 and bool((kept[start > 0] == 1).all())
    code, out, err = cli(capsys, "query", "--controller", trained, "--pref", "utility=1,grounding=1",
                         "--max-flops", 0.5, "--polish", 2, "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["flops_ratio"] <= 0.5 and got["meta"]["polish"]["steps"] == 2 and got["meta"]["polish"]["split"] == "own"
    code, out, err = cli(capsys, "query", "--controller", trained, "--pref", "grounding=1", "--max-flops", 0.5,
                         "--polish", 2)
    assert code == 0 and "polished      2 steps on the preference's split" in out, err


def test_a_preference_polished_several_times_keeps_the_try_nearest_the_teachers_answers(trained, monkeypatch):
    from dataclasses import replace

    from hipp.controller.files import load_controller
    from hipp.query.bound import load_base
    from hipp.query.polish import POLISH, on_its_split, polish, polished_plan
    from hipp.query.ranking import CALIB_INSTRUCTIONS, answer_disagreement
    from hipp.query.trade_off import plan_for_preference

    controller = load_controller(trained)
    base = load_base(controller, trained)
    plan = plan_for_preference(controller, controller.preference("utility=1,grounding=1"), max_flops=0.5)
    got = polish(base, controller, plan, steps=2, seed=5, tries=2)
    scores = got.meta["polish"]["disagreement"]
    best = 5 + min(range(2), key=scores.__getitem__)
    tries = [polished_plan(base, controller, plan, replace(POLISH, steps=2), s)[0] for s in (5, 6)]
    share = on_its_split(controller, plan, POLISH).grounding_weight
    assert scores == answer_disagreement(base, tries, CALIB_INSTRUCTIONS, existence_weight=share)
    assert got.meta["polish"]["tries"] == 2 and got == tries[best - 5]
    # the tiny controller's tries answer alike (a tie); with the second try nearer, the second is kept
    import hipp.query.polish as polishing
    assert tries[0] != tries[1]
    monkeypatch.setattr(polishing, "answer_differences", lambda base, plans, n: [(0.7, 0.7), (0.2, 0.2)])
    assert polish(base, controller, plan, steps=2, seed=5, tries=2) == tries[1]
    with pytest.raises(HippError, match="tries"):
        polish(base, controller, plan, steps=2, tries=0)


def test_a_pool_of_splits_answers_a_preference_with_the_candidate_its_split_picks(trained, monkeypatch):
    from dataclasses import replace

    import hipp.query.polish as polishing
    from hipp.controller.files import load_controller
    from hipp.query.bound import load_base, plan_for_budget
    from hipp.query.polish import POLISH, polish, polished_plan, resplit
    from hipp.query.trade_off import plan_for_preference

    controller = load_controller(trained)
    base = load_base(controller, trained)
    plan = plan_for_preference(controller, controller.preference("utility=3,grounding=1,flops=1"), max_flops=0.5)
    grounding = resplit(controller, plan, 1.0)  # the same bound and cost weight, the quality weight all on grounding
    asked = plan.meta["trade_off"]["asked"]
    assert grounding.meta["trade_off"]["asked"] == {**asked, "utility": 0.0, "grounding": asked["utility"] + asked["grounding"]}
    assert grounding.costs()["flops_ratio"] <= 0.5
    candidates = [polished_plan(base, controller, p, replace(POLISH, steps=2), 0)[0] for p in (plan, grounding)]
    seen = []

    def parts(base, plans, n):  # the grounding candidate keeps the teacher's yes / no answers, the own one the others
        seen.append(list(plans))
        return [(0.4, 0.1), (0.1, 0.3)]
    monkeypatch.setattr(polishing, "answer_differences", parts)
    got = polish(base, controller, plan, steps=2, pool=(1.0,))
    assert seen == [candidates]  # both candidates polished with the same seed, scored once
    # the preference's own share (utility 3 : grounding 1) weighs the others more:
    # 0.25 x 0.4 + 0.75 x 0.1 < 0.25 x 0.1 + 0.75 x 0.3
    assert got == candidates[0] and got.meta["polish"]["split"] == "own" and got.meta["polish"]["picked"] == 0
    monkeypatch.setattr(polishing, "answer_differences", lambda base, plans, n: [(0.4, 0.1), (0.05, 0.12)])
    got = polish(base, controller, plan, steps=2, pool=(1.0,))
    assert replace(got, preference=candidates[1].preference) == candidates[1] and got.meta["polish"]["split"] == "pool"
    assert got.preference == plan.preference and got.meta["trade_off"] == plan.meta["trade_off"]  # the user's answer
    assert got.meta["polish"]["made_for"] == grounding.preference and got.costs()["flops_ratio"] <= 0.5
    with pytest.raises(HippError, match="grounding weights"):
        polish(base, controller, plan, steps=2, pool=(1.5,))
    with pytest.raises(HippError, match="at most 16"):
        polish(base, controller, plan, steps=2, tries=4, pool=(0.0, 0.5, 1.0, 0.25))
    with pytest.raises(HippError, match="preference under a bound"):
        polish(base, controller, plan_for_budget(controller, max_flops=0.5), steps=2, pool=(1.0,))


def test_a_bound_query_exports_a_model_that_generates(trained, tmp_path, capsys):
    import json

    from hipp import load_model
    from hipp.data import words
    from hipp.data.instruct import make_samples
    from hipp.storage.checkpoint import get_processor
    code, out, err = cli(capsys, "export", "--controller", trained, "--max-flops", 0.5, "--candidates", 3,
                         "--calib-images", 10, "--out", tmp_path / "export", "--json")
    assert code == 0, err
    assert 0.48 <= json.loads(out)["flops_ratio"] <= 0.5
    search = json.loads((tmp_path / "export" / "pruned_config.json").read_text())["meta"]["search"]
    assert "greedy answers unlike the ungated model's on 10" in search["ranked_by"]
    losses = [c["loss"] for c in search["candidates"]]
    assert 1 <= len(losses) <= 3 and losses == sorted(losses) and all(0 <= x <= 1 for x in losses)
    model, processor = load_model(tmp_path / "export"), get_processor(tmp_path / "export")
    batch = words.encode(processor, make_samples("test", 3, seed=0), train=False)
    batch.pop("answers")
    tokens = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert tokens.shape[1] > batch["input_ids"].shape[1]  # it answers


def test_a_reconstructed_export_holds_the_refitted_weights(trained, tmp_path, capsys):
    import json

    from hipp import load_model
    from hipp.core.plan import Plan
    from hipp.controller.files import load_controller
    from hipp.export.reconstruct import calibration_batches, refit
    from hipp.export.slicing import materialize
    from hipp.query.bound import load_base
    from hipp.storage.fileio import load_tensors
    code, out, err = cli(capsys, "export", "--controller", trained, "--max-flops", 0.5, "--candidates", 2,
                         "--calib-images", 10, "--reconstruct", 16, "--out", tmp_path / "export", "--json")
    assert code == 0, err
    record = json.loads(out)["reconstructed"]
    assert record["inputs"] == {"sequences": 16} and record["projections"] > 0 and record["tokens"] > 16 * 64
    config = json.loads((tmp_path / "export" / "pruned_config.json").read_text())
    assert config["reconstructed"] == record
    base = load_base(load_controller(trained), trained, None, "cpu")
    plan = Plan.from_dict(config["plan"])
    plain, fitted = materialize(base.model, plan), materialize(base.model, plan)
    refit(base.model, fitted, calibration_batches(base.tokenizer, 16))
    saved = load_tensors(tmp_path / "export" / "model.safetensors")
    ours = {k: v for k, v in fitted.state_dict().items()}
    assert set(saved) == set(ours) and all(torch.equal(saved[k], ours[k]) for k in saved)
    changed = [k for k, v in plain.state_dict().items() if not torch.equal(v, ours[k])]
    assert changed and all(k.endswith(("o_proj.weight", "down_proj.weight", "out_proj.weight", "out_proj.bias",
                                       "fc2.weight", "fc2.bias")) for k in changed)
    load_model(tmp_path / "export")  # loads strictly
    code, _, err = cli(capsys, "export", "--controller", trained, "--max-flops", 0.5, "--reconstruct", -1,
                       "--out", tmp_path / "bad")
    assert code == 2 and "--reconstruct" in err and not (tmp_path / "bad").exists()


def test_bench_answers_the_test_instructions_for_every_row(trained, tmp_path, capsys):
    import json
    code, out, err = cli(capsys, "bench", "--controller", trained, "--budgets", "0.5", "--methods", "uniform,shortgpt",
                         "--test-items", 10, "--candidates", 2, "--calib-images", 10, "--visual-tokens", "0.5",
                         "--out", tmp_path / "b", "--json")
    assert code == 0, err
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert result["family"] == "generative" and result["settings"]["n"] == 10
    assert {r["method"] for r in result["results"]} == {"uniform", "shortgpt", "hipp", "hipp+tokens"}
    # tokens alone, by either rule, cannot reach half the FLOPs: recorded, not fatal
    assert {f["method"] for f in result["failures"]} == {"tokens", "tokens/cls"}  # the text rule is the default
    for r in result["results"]:
        assert 0.48 <= r["flops_ratio"] <= 0.5 and 0 <= r["utility"] <= 1
        assert r["latency_ms"]["prefill"] > 0 and "pope/adversarial_f1" in r
    cell = result["margins"]["hipp"]["0.5"]["uniform"]["utility"]
    hipp, uniform = ({r["method"]: r for r in result["results"]}[m]["utility"] for m in ("hipp", "uniform"))
    assert cell["diff"] == pytest.approx(hipp - uniform) and cell["se"] >= 0
    assert set(result["hypervolume"]) == {"uniform", "shortgpt", "hipp", "hipp+tokens"}
    assert "hipp minus each method" in (tmp_path / "b" / "bench.md").read_text()


def test_bench_adds_llava_rows_after_n_recovery_steps(trained, tmp_path, capsys):
    """The controller's plan and the best training-free plan, exported, recovered from the teacher for
    N steps on the instruction data and answered like every row; the default (contrastive) recovery
    config is refused in one line before any plan is made."""
    import json
    assert_bad(*cli(capsys, "bench", "--controller", trained, "--budgets", "0.5", "--methods", "uniform",
                    "--recover-steps", 2, "--out", tmp_path / "bad"), "a llava model takes task instruct")
    assert not (tmp_path / "bad" / "bench.json").exists()
    config = tmp_path / "recover.yaml"
    config.write_text("task: instruct\nbatch_size: 8\neval_every: 1\nval_size: 10\npatience: 0\n"
                      "warmup_steps: 1\nlr: 1.0e-3\n")
    code, out, err = cli(capsys, "bench", "--controller", trained, "--budgets", "0.5", "--methods", "uniform,shortgpt",
                         "--test-items", 10, "--candidates", 2, "--calib-images", 10, "--recover-steps", 2,
                         "--recover-config", config, "--out", tmp_path / "b", "--json")
    assert code == 0, err
    result = json.loads(out)
    rows = {r["method"]: r for r in result["results"]}
    free = max(("uniform", "shortgpt"), key=lambda m: rows[m]["utility"])
    assert set(rows) == {"uniform", "shortgpt", "hipp", "hipp+recovery", f"{free}+recovery"}
    for name in ("hipp", free):
        again = rows[f"{name}+recovery"]
        assert again["flops_ratio"] == rows[name]["flops_ratio"] and again["recovery"]["steps_run"] == 2
        assert again["metrics"] != rows[name]["metrics"] or again["recovery"]["best_step"] == 0
    cell = result["margins"]["hipp+recovery"]["0.5"][f"{free}+recovery"]["utility"]
    assert cell["se"] >= 0 and math.isfinite(cell["diff"])


def test_bench_answers_every_llava_row_refitted(trained, tmp_path, capsys):
    """`hipp bench --reconstruct N` on a LLaVA: the plans of a plain bench, each answered after the refit
    on N training instructions, margins paired as before."""
    import json
    args = ("bench", "--controller", trained, "--budgets", "0.5", "--methods", "uniform", "--test-items", 10,
            "--candidates", 2, "--calib-images", 10, "--json")
    runs = {}
    for name, extra in (("plain", ()), ("refit", ("--reconstruct", 8))):
        code, out, err = cli(capsys, *args, *extra, "--out", tmp_path / name)
        assert code == 0, err
        runs[name] = {r["method"]: r for r in json.loads(out)["results"]}, json.loads(out)
    (plain, _), (refit, result) = runs["plain"], runs["refit"]
    assert set(refit) == set(plain) == {"uniform", "hipp"}
    assert all(refit[m]["flops_ratio"] == plain[m]["flops_ratio"] for m in plain)
    assert any(refit[m]["metrics"] != plain[m]["metrics"] for m in plain)  # ten answers per kind may all agree
    assert result["settings"]["reconstructed"]["inputs"] == {"sequences": 8} and result["settings"]["reconstructed"]["rows"] == 2
    cell = result["margins"]["hipp"]["0.5"]["uniform"]["utility"]
    assert cell["diff"] == pytest.approx(refit["hipp"]["utility"] - refit["uniform"]["utility"])
    assert "Every row refitted first (calibration: 8 sequences" in (tmp_path / "refit" / "bench.md").read_text()


def test_a_task_for_the_other_family_is_one_line(tmp_path, capsys, tiny_model_dir):
    assert_bad(*cli(capsys, "train", "--config", write_config(tmp_path, task="shapes-fmnist")),
               "task 'shapes-fmnist' serves contrastive models")
    assert_bad(*cli(capsys, "train", "--config", write_config(tmp_path, model=str(tiny_model_dir))),
               "task 'instruct' serves generative models")
    assert not (tmp_path / "out" / "controller.safetensors").exists()


SHARDED = """
import sys
import hipp.training.trainer as T
from safetensors.torch import save_file
from hipp.cli.main import main

held = {}
average, shard = T.average_gradients, T.shard_base


def keep(module, processes):
    held.setdefault("module", module)
    return average(module, processes)


def spy(acc, model):
    shard(acc, model)
    held["acc"], held["param"] = acc, type(next(model.parameters())).__name__


T.average_gradients, T.shard_base = keep, spy
code = main(["train", "--config", sys.argv[1]])
if code:
    sys.exit(code)
name = f"{held['acc'].process_index}of{held['acc'].num_processes}"
save_file({k: v.detach().clone() for k, v in held["module"].state_dict().items()}, f"{sys.argv[2]}/final{name}.safetensors")
open(f"{sys.argv[2]}/param{name}.txt", "w").write(held["param"])
"""


def test_two_processes_plain_and_sharded_end_with_identical_controllers(tmp_path):
    """`accelerate launch` with two CPU processes on the LLaVA teacher, plainly and with
    `--config_file configs/accelerate_fsdp.yaml`. Plainly, each process's controller after training
    equals the other's and the one saved, and it learnt. Sharded, the base's weights become shards
    (DTensors) on each process, and the controller both processes end with, and the one saved, equals
    the plain run's (the same steps, the same batches)."""
    root = Path(__file__).resolve().parents[1]
    runs = {}
    for kind, script, launch in (("sharded", SHARDED, ["--config_file", str(root / "configs" / "accelerate_fsdp.yaml")]),
                                 ("plain", LAUNCHED, ["--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                                      "--mixed_precision", "no", "--dynamo_backend", "no"])):
        where = tmp_path / kind
        where.mkdir()
        (where / "launched.py").write_text(script)
        cfg = tmp_path / f"{kind}.yaml"
        cfg.write_text(yaml.safe_dump({**CONFIG, "steps": 3, "save_every": 3, "output": str(where / "out")}))
        accelerate = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--main_process_port", str(free_port())]
        r = subprocess.run(accelerate + [str(where / "launched.py"), str(cfg), str(where)], capture_output=True,
                           text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"})
        assert r.returncode == 0, r.stderr[-3000:]
        runs[kind] = load_file(str(where / "out" / "controller.safetensors"))
    plain = tmp_path / "plain"
    initial, final = ([load_file(str(plain / f"{kind}{i}of2.safetensors")) for i in (0, 1)]
                      for kind in ("initial", "final"))
    assert all(torch.equal(final[0][k], final[1][k]) and torch.equal(final[0][k], runs["plain"][k])
               for k in runs["plain"])
    assert any(not torch.equal(initial[0][k], final[0][k]) for k in runs["plain"])  # it learnt
    sharded = tmp_path / "sharded"
    assert [(sharded / f"param{i}of2.txt").read_text() for i in (0, 1)] == ["DTensor", "DTensor"]
    finals = [load_file(str(sharded / f"final{i}of2.safetensors")) for i in (0, 1)]
    for k, v in runs["plain"].items():
        assert torch.equal(finals[0][k], finals[1][k]) and torch.equal(finals[0][k], runs["sharded"][k])
        assert torch.allclose(runs["sharded"][k], v, atol=1e-6)



@pytest.mark.parametrize("rule", ["cls", "text"])
def test_a_joint_plan_exports_a_model_that_prunes_its_own_tokens(trained, tmp_path, capsys, rule):
    """--visual-tokens with a FLOPs bound: the plan keeps half the image tokens, ranked before the
    language model or inside it; the export records the budget, hipp.load_model re-installs it, and
    its greedy answers are the hard-gated base's, token for token; hipp eval prices the shorter prompts."""
    import json

    from hipp import load_model
    from hipp.backends import gated, visual_tokens
    from hipp.core.plan import Plan
    from hipp.data import words
    from hipp.data.instruct import make_samples
    from hipp.query.bound import load_base
    from hipp.controller.files import load_controller
    from hipp.storage.checkpoint import get_processor
    code, out, err = cli(capsys, "export", "--controller", trained, "--max-flops", 0.6, "--visual-tokens", 0.5,
                         "--token-rule", rule, "--candidates", 2, "--calib-images", 10, "--out", tmp_path / "export",
                         "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["language"]["tokens_kept"] == 32 and 0.58 <= summary["flops_ratio"] <= 0.6
    config = json.loads((tmp_path / "export" / "pruned_config.json").read_text())
    assert config["visual_tokens"]["kept"] == 32 and config["visual_tokens"]["of"] == 64
    assert config["visual_tokens"]["rule"] == rule
    plan = Plan.from_dict(config["plan"])
    model, processor = load_model(tmp_path / "export"), get_processor(tmp_path / "export")
    assert visual_tokens.installed(model) == visual_tokens.for_plan(plan)
    batch = words.encode(processor, make_samples("test", 8, seed=3), train=False)
    batch.pop("answers")
    base = load_base(load_controller(trained), trained, None, "cpu")
    with torch.no_grad():
        ours = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        with gated(base.model, plan.gates), visual_tokens.pruning(base.model, visual_tokens.for_plan(plan)):
            hard = base.model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(ours, hard) and torch.equal(ours[:, :batch["input_ids"].shape[1]], batch["input_ids"])
    from hipp.evaluation.generative import costs
    shorter, full = costs(model, [96])["prefill"], costs(load_model(tmp_path / "export"), [96])["prefill"]
    assert shorter == full  # the installed budget comes back with every load
    visual_tokens.install(model, None)
    assert costs(model, [96])["prefill"] > shorter


def test_visual_tokens_bad_input_is_one_line(trained, tmp_path, capsys, tiny_model_dir):
    assert_bad(*cli(capsys, "query", "--controller", trained, "--max-flops", 0.5, "--visual-tokens", "2"),
               "--visual-tokens takes shares in (0, 1]")
    assert_bad(*cli(capsys, "query", "--controller", trained, "--pref", "utility=1", "--visual-tokens", "0.5"),
               "--visual-tokens needs a bound")
