"""The field's pruning methods on a generative VLM: every baseline plans the embedded LLaVA teacher at
a FLOPs budget, the generative damage of many gate sets in one pass equals one pass per set, and the
bench's paired errors and hypervolume are what they claim."""
import pytest
import torch

from hipp.backends import make_prunable
from hipp.baselines import METHODS, TOLERANCE, make_calibration, make_plan
from hipp.baselines.calibration import GenerativeDamage
from hipp.baselines.multiflow import activations
from hipp.baselines.method import Context
from hipp.baselines.shortgpt import depth_keep
from hipp.errors import HippError
from hipp.evaluation.generative_bench import Answers, hypervolume_3d
from hipp.storage.checkpoint import get_processor, load_model

from conftest import LLAVA_TEACHER_DIR

GROUP = 64  # 8 channel gates per layer: 112 units, so an ablation of every unit takes seconds


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = load_model(LLAVA_TEACHER_DIR)
    processor = get_processor(LLAVA_TEACHER_DIR)
    space = make_prunable(model, GROUP)
    return model, space, make_calibration(model, processor, model.preprocess_cfg, size=20)


def test_llava_calibration_is_instructions_of_every_kind(setup):
    _, _, cal = setup
    assert cal.generative and cal.size == 20
    assert len({s.kind for s in cal.batch.samples}) == 10


def test_gate_training_draws_existence_questions_in_the_share_it_is_given(setup, monkeypatch):
    from hipp.baselines.fixed_budget import GateTraining, train_gates
    from hipp.data.instruct import mixed_kinds
    model, space, cal = setup
    drawn, batches = [], cal.task.batches

    def spy(*args, **kwargs):
        make = batches(*args, **kwargs)
        drawn.append(sum(s.kind.startswith("pope/") for s in make(0).samples))  # what the first step sees
        return make

    monkeypatch.setattr(cal.task, "batches", spy)
    for share in (None, 0.5, 0.8):
        train_gates(model, space, cal, 0.5, cfg=GateTraining(steps=1, batch_size=10, existence_share=share))
    assert drawn == [3, 5, 8]  # by default every kind in turn: 3 existence questions in 10
    assert sum(k.startswith("pope/") for k in mixed_kinds(0.8, 10)) == 8
    with pytest.raises(HippError, match="existence share"):
        GateTraining(existence_share=1.5)


@pytest.mark.parametrize("name", [m for m, method in METHODS.items() if "generative" in method.families])
def test_every_baseline_plans_the_llava_teacher_within_its_budget(setup, name):
    model, space, cal = setup
    options = {"fixed_budget": {"steps": 2, "batch_size": 10}, "mope": {"max_rounds": 1}}.get(name)
    plan = make_plan(name, model, space, 0.5, cal, options=options, cache={})
    assert 0.5 - TOLERANCE <= plan.costs()["flops_ratio"] <= 0.5 + 1e-9
    for stage in ("vision", "language"):  # neither stage is removed whole
        assert any(plan.layer_keep[i] for i, l in enumerate(space.layers) if l.tower == stage)


def test_a_contrastive_only_method_refuses_a_llava_in_one_line(setup):
    model, space, cal = setup
    with pytest.raises(HippError, match="multiflow.*contrastive"):
        make_plan("multiflow", model, space, 0.5, cal)


def test_damage_of_many_gate_sets_in_one_pass_equals_one_pass_each(setup):
    model, space, cal = setup
    damage = GenerativeDamage(model, cal, space)
    assert damage() == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(1)
    sets = []
    for _ in range(3):
        lk, heads, chans = space.all_kept()
        lk[int(torch.randint(len(lk), (1,), generator=g))] = 0.0
        heads = [(torch.rand(h.shape, generator=g) > 0.3).double() for h in heads]
        chans = [(torch.rand(c.shape, generator=g) > 0.3).double() for c in chans]
        sets.append((lk, heads, chans))
    together = damage.ablate("language", sets, max_batch=60)  # three sets in one forward
    alone = torch.tensor([damage(s) for s in sets], dtype=torch.float64)
    assert torch.allclose(together, alone, rtol=1e-4, atol=1e-5)
    assert (alone > 0).all()


def test_block_influence_orders_shortgpt_depth_removal(setup):
    model, space, cal = setup
    ctx = Context(model, space, cal)
    influence = torch.tensor([s.influence for s in activations(ctx)], dtype=torch.float64)
    assert ((influence >= 0) & (influence <= 2)).all() and influence.std() > 0
    keep = depth_keep(ctx, 0.5, influence)
    dropped = (keep == 0).nonzero().flatten().tolist()
    assert dropped  # at half the FLOPs some layer goes
    for i in dropped:  # every dropped layer is less influential than every kept layer of its stage
        same = [j for j, l in enumerate(space.layers) if l.tower == space.layers[i].tower and keep[j]]
        assert all(influence[i] <= influence[j] for j in same)


def test_taylor_scores_the_task_loss_and_leaves_the_weights_frozen(setup):
    model, space, cal = setup
    from hipp.baselines.taylor import taylor_scores
    before = [p.requires_grad for p in model.parameters()]
    scores = taylor_scores(Context(model, space, cal))
    assert [p.requires_grad for p in model.parameters()] == before
    assert all(p.grad is None for p in model.parameters())
    flat = torch.cat([*scores.heads, *scores.channels])
    assert (flat >= 0).all() and (flat > 0).sum() > len(flat) // 2


def test_paired_bootstrap_error_is_zero_for_the_same_answers_and_not_for_others(setup):
    _, _, cal = setup
    samples = cal.batch.samples
    right = Answers(samples, [s.answer for s in samples])
    wrong = Answers(samples, ["yes" if i % 2 else s.answer for i, s in enumerate(samples)])
    resamples = right.resamples(50)
    assert all(v == 0.0 for v in right.paired_se(right, resamples).values())
    se = right.paired_se(wrong, resamples)
    assert se["utility"] > 0


def test_hypervolume_3d_of_boxes():
    assert hypervolume_3d([(0.5, 0.5, 0.5)]) == pytest.approx(0.125)
    assert hypervolume_3d([(0.2, 0.5, 0.5), (0.5, 0.2, 0.5)]) == pytest.approx(0.275)  # two boxes, overlap 0.125
    assert hypervolume_3d([(0.5, 0.5, 0.5), (0.6, 0.6, 0.6)]) == pytest.approx(0.125)  # a dominated point adds nothing
    assert hypervolume_3d([(1.5, 0.0, 0.0)]) == 0.0  # outside the reference box
