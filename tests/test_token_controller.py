"""A controller that chooses the visual-token count: the chunk gates' mathematics, the soft weighing
training runs (equal to dropping the tokens when the gates are 0/1), the controller's token head, and
a trained controller's plans, bound queries and exports carrying its own count."""
import json

import pytest
import torch

from hipp.backends import decoder_tokens, gated, make_prunable, visual_tokens
from hipp.backends.visual_tokens import VisualTokens, pruning
from hipp.cli.main import main
from hipp.controller.network import Controller
from hipp.controller.files import load_controller
from hipp.core import token_gates
from hipp.training.objectives import expected_cost_ratios
from test_llava import plans, tiny_llava
from test_llava_controller import write_config
from test_query import assert_bad, cli
from test_visual_tokens import padded


# --- the gates ---

def test_chunks_cover_the_tokens_and_sampled_chunks_are_a_prefix():
    for tokens in (1, 5, 16, 17, 64, 576):
        sizes = token_gates.chunk_sizes(tokens)
        assert sum(sizes) == tokens and len(sizes) == min(16, tokens) and max(sizes) - min(sizes) <= 1
    raw = torch.randn(1000, 15, generator=torch.Generator().manual_seed(0)) * 3
    logits = token_gates.chunk_logits(raw)
    assert (logits[:, 1:] <= logits[:, :-1]).all()
    kept = token_gates.sample(logits, 0.5, torch.Generator().manual_seed(1))
    assert set(kept.unique().tolist()) <= {0.0, 1.0}
    assert (kept[:, 1:] <= kept[:, :-1]).all()  # a prefix: once a chunk goes, every later one goes
    assert torch.equal(token_gates.hard(logits), (logits > 0).float())


def test_a_chunk_is_kept_with_the_sigmoid_of_its_logit_and_the_count_is_priced_in_expectation():
    logits = token_gates.chunk_logits(torch.cat([torch.tensor([2.0]), torch.linspace(-3, 0, 14)]))  # 64 tokens
    draws = token_gates.sample(logits.expand(20000, -1), 1.0, torch.Generator().manual_seed(2))
    assert torch.allclose(draws.mean(0), torch.sigmoid(logits), atol=0.015)
    counts = token_gates.kept_count(draws, 64)
    expected = token_gates.kept_count(torch.sigmoid(logits), 64)
    assert float(counts.mean()) == pytest.approx(float(expected), abs=0.3)
    sizes = token_gates.chunk_sizes(64)
    assert float(expected) == pytest.approx(sizes[0] + sum(s * float(torch.sigmoid(l))
                                                           for s, l in zip(sizes[1:], logits)))


def test_the_initial_chunk_logits_keep_every_chunk():
    logits = token_gates.chunk_logits(token_gates.init_raw(15, 3.0))
    assert float(logits[-1]) == pytest.approx(3.0) and (logits >= 3.0 - 1e-6).all()
    assert token_gates.init_raw(0, 3.0).shape == (0,)


def test_token_weights_follow_each_tokens_rank():
    rank = torch.tensor([[3, 0, 2, 1], [0, 1, 2, 3]])  # 4 tokens, 4 chunks of one
    chunks = torch.tensor([1.0, 0.0, 0.0])  # the two best kept
    w = token_gates.token_weights(rank, chunks, 4)
    assert torch.equal(w, torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]]))


# --- the soft weighing of training ---

@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_weighing_with_whole_chunks_equals_dropping_the_tokens(kind):
    """With 0/1 chunks, every text position's logits are those of the model whose later layers never
    see the pruned tokens (DropTokens), for plans that keep, thin or drop the rank layer (then evenly
    spaced tokens) and with a left-padded row."""
    model = tiny_llava(kind)
    level = decoder_tokens.level(model, after=0)
    space = make_prunable(model).with_tokens(level)
    inputs = padded(model)
    text = (inputs["input_ids"] != model.config.image_token_id) & inputs["attention_mask"].bool()
    gates_of = token_gates.gates_of(level.tokens)
    for name in ("partial_and_dropped", "empty_branches", None):
        gates = plans(space)[name] if name else space.all_kept()
        for j in (0, 4, gates_of):
            chunks = (torch.arange(gates_of) < j).float()
            k = int(token_gates.kept_count(chunks, level.tokens))
            with torch.no_grad(), gated(model, gates):
                with pruning(model, VisualTokens(k, level.tokens, level.rank_layer, "text")):
                    dropped = model(**inputs).logits
                with decoder_tokens.weighing(model, level, chunks, inputs["input_ids"], inputs["attention_mask"]):
                    weighed = model(**inputs).logits
            assert torch.allclose(weighed[text], dropped[text], atol=1e-5, rtol=0), (name, k)
            if k < level.tokens:
                assert (weighed[text] - model(**inputs).logits[text]).abs().max() > 1e-4  # the tokens matter
    assert all(getattr(b.attn, "key_weight", None) is None for b in model.model.language_model.layers)


def test_a_dropped_chunk_still_gets_a_gradient():
    """A chunk at weight 0 in the forward pass still gets a finite, non-zero gradient: attention weighs
    probabilities by it rather than adding a log of 0."""
    model = tiny_llava("llama")
    level = decoder_tokens.level(model, after=0)
    make_prunable(model)
    inputs = padded(model)
    soft = torch.sigmoid(torch.linspace(3, -3, token_gates.gates_of(level.tokens))).requires_grad_()
    chunks = token_gates.straight_through(soft)
    with decoder_tokens.weighing(model, level, chunks, inputs["input_ids"], inputs["attention_mask"]):
        loss = model(**inputs).logits[:, -1].logsumexp(-1).sum()
    loss.backward()
    assert torch.isfinite(soft.grad).all() and (soft.grad[chunks.detach() == 0] != 0).all()


# --- the controller ---

def token_space():
    model = tiny_llava("llama")
    return make_prunable(model, tokens="text")


def test_the_controller_starts_dense_and_its_token_head_learns_from_the_cost():
    space = token_space()
    torch.manual_seed(0)
    c = Controller(space, ("utility", "flops"), hidden=8, rank=2)
    pref = torch.tensor([0.0, 1.0])
    assert c.plan(pref).token_keep.tolist() == [space.tokens[0].tokens]  # every chunk kept at first
    (logits, heads, channels), chunks = c(pref, with_tokens=True)
    counts = token_gates.kept_count(torch.sigmoid(chunks[0]), space.tokens[0].tokens)[None]
    flops = expected_cost_ratios(space, (torch.sigmoid(logits), [torch.sigmoid(h) for h in heads],
                                         [torch.sigmoid(x) for x in channels]), counts)["flops"]
    flops.backward()
    assert c.tokens.bias.grad.abs().sum() > 0  # fewer tokens, fewer FLOPs
    before = c.plan(pref)
    with torch.no_grad():
        c.tokens.bias[0] = -5.0  # the first gated chunk's logit below 0: every gated chunk goes
    plan = c.plan(pref)
    assert plan.token_keep.tolist() == [token_gates.chunk_sizes(space.tokens[0].tokens)[0]]
    (l0, h0, c0), (l1, h1, c1) = before.gates, plan.gates  # the weights' gates do not move
    assert torch.equal(l0, l1) and all(map(torch.equal, h0 + c0, h1 + c1))
    assert plan.costs()["flops_ratio"] < before.costs()["flops_ratio"]


def test_a_token_controller_saves_and_loads_strictly(tmp_path):
    space = token_space()
    c = Controller(space, ("utility", "flops"), hidden=8, rank=2)
    with torch.no_grad():
        c.tokens.bias.add_(torch.linspace(0, -8, c.tokens.bias.numel()))
    c.save(tmp_path / "c", fingerprint="abc")
    back = load_controller(tmp_path / "c")
    assert back.space == space and back.space.tokens[0].rule == "text"
    pref = {"utility": 0.5, "flops": 0.5}
    assert back.plan(pref) == c.plan(pref)
    assert torch.equal(back.token_counts(torch.tensor([[0.5, 0.5]])), c.token_counts(torch.tensor([[0.5, 0.5]])))


# --- a trained controller ---

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llava-tokens")
    assert main(["train", "--config", write_config(tmp, visual_tokens="text", steps=3, save_every=3)]) == 0
    return tmp / "out"


def test_training_prices_the_tokens_and_plans_carry_the_count(trained, capsys):
    rows = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(0 < r["flops"] < 1 for r in rows)
    controller = load_controller(trained)
    assert controller.space.tokens[0].rule == "text"
    code, out, err = cli(capsys, "query", "--controller", trained, "--pref", "utility=0.2,flops=0.8", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["language"]["tokens_kept"] == int(controller.plan({"utility": 0.2, "flops": 0.8}).token_keep[0])


def test_a_bound_query_fits_each_preference_at_its_own_count_and_exports_it(trained, tmp_path, capsys):
    from hipp import load_model
    from hipp.core.plan import Plan
    with torch.no_grad():
        controller = load_controller(trained)
        controller.tokens.bias[0] = -50.0  # every preference's plan keeps the first chunk only
        controller.save(tmp_path / "c", fingerprint=controller.fingerprint)
    code, out, err = cli(capsys, "export", "--controller", tmp_path / "c", "--max-flops", 0.5, "--candidates", 3,
                         "--calib-images", 10, "--out", tmp_path / "export", "--json")
    assert code == 0, err
    summary = json.loads(out)
    config = json.loads((tmp_path / "export" / "pruned_config.json").read_text())
    plan = Plan.from_dict(config["plan"])
    assert 0.48 <= summary["flops_ratio"] <= 0.5 and plan.space.tokens[0].rule == "text"
    assert {c["tokens_kept"][0] for c in config["meta"]["search"]["candidates"]} == {4}
    own = controller.token_counts(torch.tensor([[plan.preference[n] for n in controller.objective_names]]))
    assert plan.token_keep.tolist() == own[0].tolist()  # the weights were fitted at the preference's own count
    assert plan.prunes_tokens and summary["language"]["tokens_kept"] == 4
    assert visual_tokens.installed(load_model(tmp_path / "export")) == visual_tokens.for_plan(plan)
    code, out, err = cli(capsys, "query", "--controller", tmp_path / "c", "--pref", "utility=1", "--round", 64, "--json")
    assert code == 0, err
    assert json.loads(out)["language"]["tokens_kept"] == 4  # rounding the weights keeps the count


def test_bench_sets_a_token_controller_against_baselines_in_the_weights_space(trained, tmp_path, capsys):
    """Baselines prune weights only; their plans keep every token of the controller's token level."""
    code, out, err = cli(capsys, "bench", "--controller", trained, "--budgets", "0.5", "--methods", "uniform",
                         "--test-items", 10, "--candidates", 2, "--calib-images", 10, "--out", tmp_path / "b", "--json")
    assert code == 0, err
    rows = {r["method"]: r for r in json.loads(out)["results"]}
    assert set(rows) == {"uniform", "hipp"} and all(0.45 <= r["flops_ratio"] <= 0.5 for r in rows.values())


def test_visual_tokens_in_a_training_config_bad_input_is_one_line(tmp_path, capsys, tiny_model_dir):
    assert_bad(*cli(capsys, "train", "--config", write_config(tmp_path, visual_tokens="cls")),
               "visual_tokens must be 'text'")
    clip = write_config(tmp_path, visual_tokens="text", model=str(tiny_model_dir), task="shapes-fmnist")
    assert_bad(*cli(capsys, "train", "--config", clip), "a controller chooses visual tokens for a LLaVA only")
    assert not (tmp_path / "out" / "controller.json").exists()


@pytest.mark.parametrize("field, value, needle", [("tokens", "abc", "space.tokens must be a list"),
                                                  ("rule", "zzz", "space.tokens[0].rule"),
                                                  ("tokens_count", 0, "space.tokens[0].tokens"),
                                                  ("after", 1.5, "space.tokens[0].after")])
def test_a_malformed_token_level_in_a_controller_file_is_one_line(tmp_path, capsys, field, value, needle):
    c = Controller(token_space(), ("utility", "flops"), hidden=8, rank=2)
    c.save(tmp_path / "c", fingerprint="abc")
    path = tmp_path / "c" / "controller.json"
    cfg = json.loads(path.read_text())
    if field == "tokens":
        cfg["space"]["tokens"] = value
    else:
        cfg["space"]["tokens"][0]["tokens" if field == "tokens_count" else field] = value
    path.write_text(json.dumps(cfg))
    assert_bad(*cli(capsys, "query", "--controller", tmp_path / "c", "--pref", "utility=1"), needle)
