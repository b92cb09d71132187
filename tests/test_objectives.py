import math

import pytest
import torch

from hipp.errors import HippError
from hipp.training.objectives import (Embeddings, ObjectiveConfig, Objectives, chebyshev_scalarize, expected_cost_ratios,
                             grounding_loss, linear_scalarize, margins, utility_loss, utility_terms)
from hipp.core.space import LayerSpec, PruneSpace


def small_space() -> PruneSpace:
    layers = (LayerSpec("image", 0, 16, 4, 4, 32, 5), LayerSpec("image", 1, 16, 4, 4, 32, 5),
              LayerSpec("text", 0, 8, 2, 4, 24, 6, channel_group=5))
    return PruneSpace(layers, {"image": 100.0, "text": 50.0}, {"image": 10.0, "text": 20.0})


def embeddings(seed=0, b=8, d=16, n=None) -> Embeddings:
    g = torch.Generator().manual_seed(seed)
    neg_shape = (b, d) if n is None else (b, n, d)
    return Embeddings(torch.randn(b, d, generator=g), torch.randn(b, d, generator=g), torch.randn(*neg_shape, generator=g))


def nudged(e: Embeddings, amount=0.3, seed=1) -> Embeddings:
    g = torch.Generator().manual_seed(seed)
    return Embeddings(*(x + amount * torch.randn(x.shape, generator=g) for x in (e.image, e.text, e.negatives)))


def test_utility_is_zero_at_the_teacher_and_positive_otherwise():
    t = embeddings()
    assert float(utility_loss(t, t, 100.0)) == pytest.approx(0.0, abs=1e-6)
    s = nudged(t)
    terms = utility_terms(s, t, 100.0)
    assert all(float(v) > 0 for v in terms.values())
    assert float(utility_loss(s, t, 100.0)) == pytest.approx(
        float(0.5 * (terms["kl_i2t"] + terms["kl_t2i"]) + terms["cosine"]))
    # utility grows as the student drifts further
    assert float(utility_loss(nudged(t, 1.0), t, 100.0)) > float(utility_loss(s, t, 100.0))


def test_utility_is_invariant_to_embedding_norms_and_gradients_reach_only_the_student():
    t = embeddings()
    s = nudged(t)
    scaled = Embeddings(3 * s.image, 0.5 * s.text)
    assert float(utility_loss(scaled, t, 50.0)) == pytest.approx(float(utility_loss(s, t, 50.0)), rel=1e-5)
    img = s.image.clone().requires_grad_(True)
    timg = t.image.clone().requires_grad_(True)
    utility_loss(Embeddings(img, s.text), Embeddings(timg, t.text), 50.0).backward()
    assert img.grad.abs().sum() > 0 and timg.grad is None


def test_kl_terms_are_normalised_by_log_batch():
    # A student whose similarity matrix is uniform while the teacher's is one-hot scores ~1 per direction.
    b, d = 16, 16
    t = Embeddings(torch.eye(b, d), torch.eye(b, d))
    s = Embeddings(torch.ones(b, d), torch.ones(b, d))
    terms = utility_terms(s, t, 1000.0)
    assert float(terms["kl_i2t"]) == pytest.approx(1.0, abs=1e-3)
    assert float(terms["kl_t2i"]) == pytest.approx(1.0, abs=1e-3)


def test_grounding_is_zero_at_the_teacher():
    t = embeddings(n=3)
    for mode in ("hinge", "squared", "odds"):
        assert float(grounding_loss(t, t, mode, logit_scale=50.0)) == pytest.approx(0.0, abs=1e-6)


def test_grounding_odds_is_one_when_a_sure_teacher_meets_a_student_that_cannot_tell():
    # The teacher is sure of the true caption (scale * margin large); a student with margin 0 has odds
    # 1/2, which costs KL(1 || 1/2) = log 2 per pair, i.e. 1 after the normalisation.
    t = embeddings()
    t = Embeddings(t.image, t.image, -t.image)                    # margin 2 for every pair
    collapsed = Embeddings(t.image, t.text, t.text)               # margin 0
    assert float(grounding_loss(collapsed, t, "odds", logit_scale=100.0)) == pytest.approx(1.0, abs=1e-3)
    # Unlike hinge, certainty the teacher does not have is charged: an unsure teacher, a sure student.
    assert float(grounding_loss(t, collapsed, "odds", logit_scale=100.0)) > 10
    with pytest.raises(HippError, match="needs the model's logit scale"):
        grounding_loss(t, t, "odds")


def test_grounding_hinge_charges_only_lost_margin():
    t = embeddings()
    t = Embeddings(t.image, t.image + 0.5 * t.text, t.negatives)  # teacher prefers the true caption
    assert float(margins(t).mean()) > 0
    collapsed = Embeddings(t.image, t.text, t.text)                # student cannot tell them apart
    assert float(grounding_loss(collapsed, t, "hinge")) == pytest.approx(
        float(margins(t).clamp_min(0).sum() / margins(t).abs().sum()), rel=1e-5)
    assert float(grounding_loss(collapsed, t, "hinge")) > 0.5
    sharper = Embeddings(t.image, t.image, -t.image)               # margin 2: the largest possible
    assert float(grounding_loss(sharper, t, "hinge")) == 0.0
    assert float(grounding_loss(sharper, t, "squared")) > 0.0


def test_grounding_with_several_negatives_and_without_any():
    t = embeddings(n=4)
    assert margins(t).shape == (8, 4)
    assert float(grounding_loss(nudged(t), t, "squared")) > 0
    with pytest.raises(HippError, match="needs hard-negative captions"):
        grounding_loss(Embeddings(t.image, t.text), Embeddings(t.image, t.text))
    with pytest.raises(HippError, match="unknown grounding mode 'l1'"):
        grounding_loss(t, t, "l1")


def test_cost_of_all_kept_gates_is_one_and_falls_as_gates_close():
    space = small_space()
    layer, heads, chans = space.all_kept()
    full = expected_cost_ratios(space, (layer, heads, chans))
    for k in ("flops", "params", "flops/image", "params/text"):
        assert float(full[k]) == pytest.approx(1.0)
    half = expected_cost_ratios(space, (layer, [h * 0.5 for h in heads], chans))
    fewer = expected_cost_ratios(space, (layer, [h * 0.5 for h in heads], [c * 0.5 for c in chans]))
    assert 1.0 > float(half["flops"]) > float(fewer["flops"])
    assert 1.0 > float(half["params"]) > float(fewer["params"])
    none = expected_cost_ratios(space, (layer * 0, heads, chans))
    dense = space.dense_costs()
    assert float(none["flops"]) == pytest.approx(150.0 / (dense["flops/image"] + dense["flops/text"]))
    assert float(none["params"]) == pytest.approx(30.0 / (dense["params/image"] + dense["params/text"]))


def test_expected_cost_is_differentiable_and_batched():
    space = small_space()
    logits = torch.zeros(2, 3, requires_grad=True)
    layer = torch.sigmoid(logits)
    heads = [torch.ones(2, l.num_heads) for l in space.layers]
    chans = [torch.ones(2, l.num_channel_gates) for l in space.layers]
    r = expected_cost_ratios(space, (layer, heads, chans))
    assert r["flops"].shape == (2,)
    r["flops"].sum().backward()
    assert bool((logits.grad > 0).all())


def test_chebyshev_is_the_worst_weighted_term_and_linear_the_sum():
    losses = torch.tensor([0.2, 0.5, 0.9])
    pref = torch.tensor([0.5, 0.3, 0.2])
    assert float(linear_scalarize(losses, pref)) == pytest.approx(0.1 + 0.15 + 0.18)
    assert float(chebyshev_scalarize(losses, pref)) == pytest.approx(0.18)
    assert float(chebyshev_scalarize(losses, pref)) <= float(linear_scalarize(losses, pref))
    shifted = chebyshev_scalarize(losses, pref, ideal=torch.tensor([0.0, 0.0, 0.5]), scale=torch.tensor([1, 0.5, 1]))
    assert float(shifted) == pytest.approx(0.3)  # 0.3 * 0.5 / 0.5 now beats 0.2 * 0.4
    assert float(chebyshev_scalarize(losses, pref, rho=0.1)) == pytest.approx(0.18 + 0.1 * 0.43)


def test_loss_scales_divide_each_term_under_the_linear_scalarization_too():
    space = small_space()
    losses = {"utility": torch.tensor(0.1), "flops": torch.tensor(0.5)}
    pref = torch.tensor([0.5, 0.5])
    plain = Objectives(ObjectiveConfig(names=("utility", "flops")), space)
    scaled = Objectives(ObjectiveConfig(names=("utility", "flops"), scale={"utility": 0.1}), space)
    assert float(plain.scalarize(losses, pref)) == pytest.approx(0.5 * 0.1 + 0.5 * 0.5)
    assert float(scaled.scalarize(losses, pref)) == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)


def test_keep_reward_pulls_a_quality_only_preference_towards_dense_and_leaves_a_cost_only_one():
    space = small_space()
    names = ("utility", "grounding", "flops", "params")
    plain = Objectives(ObjectiveConfig(names=names), space)
    kept = Objectives(ObjectiveConfig(names=names, keep_reward=0.1), space)
    for pref, quality in (([1.0, 0.0, 0.0, 0.0], 1.0), ([0.3, 0.2, 0.5, 0.0], 0.5), ([0.0, 0.0, 0.4, 0.6], 0.0)):
        flops = torch.tensor(0.6, requires_grad=True)
        losses = {"utility": torch.tensor(0.2), "grounding": torch.tensor(0.3), "flops": flops, "params": torch.tensor(0.8)}
        p = torch.tensor(pref)
        got = kept.scalarize(losses, p)
        assert float(got.detach()) == pytest.approx(float(plain.scalarize(losses, p).detach()) - 0.1 * quality * 0.7)
        got.backward()
        assert float(flops.grad) == pytest.approx(pref[2] - 0.1 * quality / 2)  # a quality-only preference: < 0
    with pytest.raises(HippError, match="keep_reward"):
        ObjectiveConfig(names=("utility", "grounding"), keep_reward=0.1)
    with pytest.raises(HippError, match="keep_reward"):
        ObjectiveConfig(names=names, keep_reward=-0.1)
    # a power keeps the reward to near-quality-only preferences: the quality weight 0.5 earns 0.5 ** 4
    vertex = Objectives(ObjectiveConfig(names=names, keep_reward=0.1, keep_reward_power=4), space)
    losses = {"utility": torch.tensor(0.2), "grounding": torch.tensor(0.3), "flops": torch.tensor(0.6),
              "params": torch.tensor(0.8)}
    for pref, quality in (([1.0, 0.0, 0.0, 0.0], 1.0), ([0.3, 0.2, 0.5, 0.0], 0.5 ** 4)):
        p = torch.tensor(pref)
        assert float(vertex.scalarize(losses, p)) == pytest.approx(float(plain.scalarize(losses, p)) - 0.1 * quality * 0.7)
    for bad in (0.5, True, "8"):
        with pytest.raises(HippError, match="keep_reward_power"):
            ObjectiveConfig(names=names, keep_reward=0.1, keep_reward_power=bad)


def test_chebyshev_gradient_reaches_only_the_worst_term_unless_smoothed():
    pref = torch.tensor([0.5, 0.3, 0.2])
    x = torch.tensor([0.2, 0.5, 0.9], requires_grad=True)
    chebyshev_scalarize(x, pref).backward()
    assert x.grad.tolist() == pytest.approx([0.0, 0.0, 0.2])
    x.grad = None
    linear_scalarize(x, pref).backward()
    assert x.grad.tolist() == pytest.approx(pref.tolist())
    x.grad = None
    smooth = chebyshev_scalarize(x, pref, smooth=0.05)
    smooth.backward()
    assert bool((x.grad > 0).all())
    assert 0.18 <= float(smooth.detach()) <= 0.18 + 0.05 * math.log(3)


def test_chebyshev_reaches_a_non_convex_front_point_linear_cannot():
    # Three trade-offs; the balanced one lies above the line through the extremes (non-convex front).
    front = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.6]])
    pref = torch.tensor([0.5, 0.5])
    assert int(linear_scalarize(front, pref).argmin()) in (0, 1)
    assert int(chebyshev_scalarize(front, pref).argmin()) == 2


def test_objectives_end_to_end_and_config_validation():
    space = small_space()
    t = embeddings()
    s = nudged(t)
    probs = space.all_kept()
    for kind in ("linear", "chebyshev"):
        obj = Objectives(ObjectiveConfig.from_dict({"scalarization": kind, "smooth": 0.01}), space)
        losses = obj.losses(probs, s, t, 100.0)
        assert list(losses) == ["utility", "grounding", "flops", "params"]
        total = obj.scalarize(losses, torch.tensor([0.25, 0.25, 0.25, 0.25]))
        assert total.dim() == 0 and float(total) > 0
    costs_only = Objectives(ObjectiveConfig(names=("utility", "flops")), space)
    batch = (probs[0].expand(3, -1), [h.expand(3, -1) for h in probs[1]], [c.expand(3, -1) for c in probs[2]])
    losses = costs_only.losses(batch, s, t, 100.0)
    assert costs_only.stack(losses).shape == (3, 2)
    with pytest.raises(HippError, match="unknown scalarization 'pbi'"):
        ObjectiveConfig(scalarization="pbi")
    with pytest.raises(HippError, match="among utility, grounding, flops, params, latency"):
        ObjectiveConfig(names=("utility", "speed"))
    with pytest.raises(HippError, match="unknown objectives setting 'weights'"):
        ObjectiveConfig.from_dict({"weights": [1, 2]})
    with pytest.raises(HippError, match="ideal names 'params'"):
        ObjectiveConfig(names=("utility", "flops"), ideal={"params": 0.1})
    with pytest.raises(HippError, match="needs the model's logit scale"):
        costs_only.losses(probs, s, t)
