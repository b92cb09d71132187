"""Controller training: real Accelerate (one and two CPU processes), resume, bad input."""
import json
from dataclasses import asdict
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hipp.storage.checkpoint import save_model
from hipp.errors import HippError
from hipp.training.trainer import TrainConfig, TrainingDiverged, lr_factor, sample_targets, train

from conftest import TINY_CFG, TINY_PP

BASE = {
    "channel_group": 16, "seed": 0, "steps": 4, "pref_groups": 2, "save_every": 2, "lr": 1.0e-2,
    "controller": {"hidden": 16, "rank": 4},
    "data": {"batch_size": 8, "shape_fraction": 1.0, "negatives": 2},
}


def write_config(tmp_path, model_dir, name="cfg.yaml", **over):
    cfg = {**BASE, "model": str(model_dir), "output": str(tmp_path / "out"), **over}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def hipp(*args, launcher=None):
    cmd = (launcher or [sys.executable, "-m"]) + ["hipp", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def weights(out):
    return load_file(str(out / "controller.safetensors"))


def test_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    from hipp.config import load_config
    cfg = load_config(TrainConfig, write_config(tmp_path, tiny_model_dir, lr_schedule="cosine"))
    cfg.output = str(tmp_path / "straight")
    train(cfg)
    cfg.output = str(tmp_path / "resumed")
    train(cfg, max_steps=2)
    half = weights(tmp_path / "resumed")
    train(cfg, resume=True)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], half[k]) for k in a), "the resumed steps changed nothing"
    lines = (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 4
    lrs = [json.loads(line)["lr"] for line in lines]  # the cosine schedule carries across the resume
    assert lrs == pytest.approx([cfg.lr * lr_factor("cosine", s, 4) for s in range(4)])
    assert lrs[0] == pytest.approx(cfg.lr) and lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.2 * cfg.lr


def test_lr_factor():
    assert [lr_factor("constant", s, 10) for s in (0, 5, 10)] == [1.0, 1.0, 1.0]
    assert [lr_factor("cosine", s, 10) for s in (0, 5, 10, 20)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    with pytest.raises(HippError, match="unknown lr schedule 'step'"):
        lr_factor("step", 0, 10)


def test_bias_lr_mult_speeds_up_only_the_per_unit_biases(tiny_model_dir, tmp_path):
    from dataclasses import asdict

    from hipp.backends import make_prunable
    from hipp.storage.checkpoint import load_model
    from hipp.config import load_config
    from hipp.controller.network import Controller
    from hipp.training.objectives import ObjectiveConfig
    cfg = load_config(TrainConfig, write_config(tmp_path, tiny_model_dir, steps=1, bias_lr_mult=10.0))
    train(cfg)
    space = make_prunable(load_model(str(tiny_model_dir)), cfg.channel_group)
    torch.manual_seed(cfg.seed)  # the controller as train() initialises it
    init = Controller(space, ObjectiveConfig.from_dict(cfg.objectives).names, **asdict(cfg.controller)).state_dict()
    after = weights(tmp_path / "out")
    step = {k: float((after[k] - init[k]).abs().max()) for k in init}
    # Adam's first step moves each parameter by about its learning rate
    assert max(v for k, v in step.items() if k.startswith("bias.")) == pytest.approx(10 * cfg.lr, rel=0.05)
    assert max(v for k, v in step.items() if not k.startswith("bias.")) == pytest.approx(cfg.lr, rel=0.05)


# Run under `accelerate launch`: the CLI's training, then each process writes the controller it
# started from and the one it ended with, read from the objects handed to Accelerator.prepare, in
# files named by its index and the process count (a launch that ran one process writes no "of2").
LAUNCHED = """
import sys
from accelerate import Accelerator
from safetensors.torch import save_file
from hipp.cli.main import main

held = []
prepare = Accelerator.prepare


def keep(self, controller, *rest):
    held.append({k: v.detach().clone() for k, v in controller.state_dict().items()})
    prepared = prepare(self, controller, *rest)
    held.append((self, prepared[0]))
    return prepared


Accelerator.prepare = keep
code = main(["train", "--config", sys.argv[1]])
if code:
    sys.exit(code)
initial, (acc, controller) = held
final = {k: v.detach().clone() for k, v in acc.unwrap_model(controller).state_dict().items()}
name = f"{acc.process_index}of{acc.num_processes}.safetensors"
save_file(initial, f"{sys.argv[2]}/initial{name}")
save_file(final, f"{sys.argv[2]}/final{name}")
"""


def free_port() -> int:
    import socket
    with socket.socket() as s:  # not the fixed default, which another test run may hold
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_one_controller_on_their_joint_batch(tiny_model_dir, tmp_path, monkeypatch):
    """Two CPU processes under `accelerate launch` end with identical controllers, and that controller
    is the one a single process trains when each step's loss is the mean of the two processes' shares
    (process_loss for processes 0 and 1 of 2): one backward and one AdamW step on the global batch.
    Unsynchronised gradients, or one process's gradients alone, fail it."""
    from hipp.config import load_config
    from hipp.training import trainer
    cfg_path = write_config(tmp_path, tiny_model_dir, steps=2, target_prob=0.5)
    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED)
    # `--cpu --num_processes 2` starts one process (without mpirun, accelerate's CPU launcher runs the
    # script once); the torchrun launcher of --multi_gpu, held to the CPU, starts two that use gloo.
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(free_port())]
    r = subprocess.run(accelerate + [str(script), str(cfg_path), str(tmp_path)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"})
    assert r.returncode == 0, r.stderr[-3000:]
    initial, final = ([load_file(str(tmp_path / f"{kind}{i}of2.safetensors")) for i in (0, 1)]
                      for kind in ("initial", "final"))
    saved = weights(tmp_path / "out")
    assert final[0].keys() == final[1].keys() == saved.keys() == initial[0].keys()
    assert all(torch.equal(initial[0][k], initial[1][k]) for k in saved)
    assert all(torch.equal(final[0][k], final[1][k]) and torch.equal(final[0][k], saved[k]) for k in saved)

    shares = []
    one_process = trainer.process_loss

    def global_batch(cfg, step, process, processes, *rest):
        assert (process, processes) == (0, 1)
        (l0, t0), (l1, t1) = (one_process(cfg, step, i, 2, *rest) for i in (0, 1))
        shares.append((float(l0.detach()), float(l1.detach())))
        return (l0 + l1) / 2, {n: (t0[n] + t1[n]) / 2 for n in t0}

    monkeypatch.setattr(trainer, "process_loss", global_batch)
    cfg = load_config(TrainConfig, cfg_path)
    cfg.output = str(tmp_path / "reference")
    train(cfg)
    reference = weights(tmp_path / "reference")
    assert len(shares) == 2 and all(a != b for a, b in shares)  # the processes saw different data
    # Adam moves each weight by about lr a step; float reassociation of the all-reduce is ~1e-7 of that
    moved = max(float((final[0][k] - initial[0][k]).abs().max()) for k in saved)
    assert moved > cfg.lr
    for k in saved:
        torch.testing.assert_close(final[0][k], reference[k], rtol=0, atol=1e-3 * cfg.lr)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    from hipp.config import load_config
    from hipp.training.objectives import Objectives
    cfg = load_config(TrainConfig, write_config(tmp_path, tiny_model_dir))
    train(cfg, max_steps=2)
    good = weights(tmp_path / "out")
    monkeypatch.setattr(Objectives, "scalarize", lambda self, losses, pref: torch.tensor(float("nan")))
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 3.*step 2"):
        train(cfg, resume=True)
    after = weights(tmp_path / "out")
    assert all(torch.equal(good[k], after[k]) for k in good)


def test_bad_input_is_one_line_and_overwrites_nothing(tiny_model_dir, tmp_path, capsys):
    """In-process through the CLI's main (tests/test_fuzz.py shows real processes exit the same way)."""
    from hipp.cli.main import main

    def hipp(*args):
        code = main(list(args))
        return subprocess.CompletedProcess(args, code, *capsys.readouterr())

    def bad(r, needle):
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], r.stderr

    bad(hipp("train", "--config", str(write_config(tmp_path, tiny_model_dir, name="u.yaml", stepz=3))),
        "unknown config key 'stepz'")
    bad(hipp("train", "--config", str(write_config(tmp_path, tiny_model_dir, name="t.yaml", steps="many"))),
        "config key 'steps'")
    bad(hipp("train", "--config", str(write_config(tmp_path, tiny_model_dir, name="n.yaml",
                                                   controller={"hiden": 3}))), "controller.hiden")
    bad(hipp("train", "--config", str(tmp_path / "missing.yaml")), "config file not found")
    good = write_config(tmp_path, tiny_model_dir)
    assert hipp("train", "--config", str(good), "--max-steps", "2").returncode == 0
    before = (tmp_path / "out" / "controller.safetensors").read_bytes()
    bad(hipp("train", "--config", str(good)), "not empty")
    other = tmp_path / "other-model"
    torch.manual_seed(1)
    import open_clip
    save_model(open_clip.CLIP(**TINY_CFG), other, TINY_CFG, TINY_PP, dtype=torch.float32)
    bad(hipp("train", "--config", str(write_config(tmp_path, other, name="o.yaml")), "--resume"), "settings changed, base_fingerprint")
    assert (tmp_path / "out" / "controller.safetensors").read_bytes() == before


def test_config_validation_in_process(tiny_model_dir, tmp_path):
    from hipp.config import load_config
    with pytest.raises(HippError, match="'data.batch_size'"):
        load_config(TrainConfig, write_config(tmp_path, tiny_model_dir, data={"batch_size": 1}))
    with pytest.raises(HippError, match="'bias_lr_mult'"):
        load_config(TrainConfig, write_config(tmp_path, tiny_model_dir, bias_lr_mult=0.0))
    with pytest.raises(HippError, match="'lr_schedule'"):
        load_config(TrainConfig, write_config(tmp_path, tiny_model_dir, lr_schedule="linear"))
    with pytest.raises(HippError, match="scalarization"):
        load_config(TrainConfig, write_config(tmp_path, tiny_model_dir, objectives={"scalarization": "sum"}))


def test_target_groups_drop_the_cost_weights_and_draw_targets_in_range():
    from hipp.core.preference import sample_dirichlet
    names = ("utility", "grounding", "flops", "params")
    g = torch.Generator().manual_seed(0)
    prefs = torch.cat([sample_dirichlet(63, 0.5, 4, generator=g), torch.tensor([[0.0, 0.0, 1.0, 0.0]])])
    plain = TrainConfig(pref_groups=64)
    state = g.get_state()
    same, none = sample_targets(plain, prefs, names, g)
    assert torch.equal(same, prefs) and torch.isnan(none).all()
    assert torch.equal(g.get_state(), state)  # no target draws: a run without targets keeps its stream
    cfg = TrainConfig(pref_groups=64, target_prob=0.5, target_range=[0.3, 0.6])
    assert cfg.target_range == [0.3, 0.6]
    out, t = sample_targets(cfg, prefs, names, g)
    on = torch.isfinite(t)
    assert 10 < int(on.sum()) < 54
    assert bool(((t[on] >= 0.3) & (t[on] <= 0.6)).all())
    assert torch.equal(out[~on], prefs[~on])
    assert bool((out[on][:, 2:] == 0).all()) and torch.allclose(out[on].sum(-1), torch.ones(int(on.sum())))
    both = on & (prefs[:, :2].sum(-1) > 0)
    assert torch.allclose(out[both, 0] * prefs[both, 1], out[both, 1] * prefs[both, 0])  # quality ratio kept
    everything = TrainConfig(pref_groups=64, target_prob=1.0)
    out, _ = sample_targets(everything, prefs, names, g)
    assert out[-1].tolist() == [0.5, 0.5, 0.0, 0.0]  # a pure cost preference: equal quality weights


def test_training_for_a_flops_target_moves_the_expected_cost_to_it(tiny_model_dir, tmp_path):
    from hipp.config import load_config
    from hipp.controller.network import Controller
    from hipp.controller.files import load_controller
    from hipp.training.objectives import expected_cost_ratios
    cfg = load_config(TrainConfig, write_config(tmp_path, tiny_model_dir, steps=12, save_every=12, target_prob=1.0,
                                                target_range=[0.4, 0.4], target_penalty=50.0, bias_lr_mult=10.0))
    train(cfg)
    c = load_controller(tmp_path / "out")
    assert c.takes_target
    pref = torch.tensor([0.5, 0.5, 0.0, 0.0])
    fresh = Controller(c.space, c.objective_names, **c.hparams)
    with torch.no_grad():
        before = float(expected_cost_ratios(c.space, fresh.keep_probs(pref))["flops"])
        after = float(expected_cost_ratios(c.space, c.keep_probs(pref, 0.4))["flops"])
    assert before > 0.8 and abs(after - 0.4) < 0.1, (before, after)  # measured: 0.911 -> 0.367
    with pytest.raises(HippError, match="needs the 'flops' objective and a quality objective"):
        load_config(TrainConfig, write_config(tmp_path, tiny_model_dir, name="x.yaml", target_prob=0.5,
                                              objectives={"names": ["utility", "params"]}))
    for key, value in (("target_range", [0.5, 0.2]), ("target_range", [0, 0.5]), ("target_prob", 1.5),
                       ("target_penalty", 0)):
        with pytest.raises(HippError, match=f"'{key}'"):
            load_config(TrainConfig, write_config(tmp_path, tiny_model_dir, name="y.yaml", **{key: value}))


def test_an_architecture_without_weights_is_rebuilt_with_the_training_seed(tmp_path):
    """`model: ViT-B-32, pretrained: null` builds random weights from the config's seed, so the query
    and export of its controller rebuild the same base (same fingerprint) instead of refusing it."""
    from hipp.backends import make_prunable
    from hipp.storage.checkpoint import fingerprint, load_model
    from hipp.controller.network import Controller
    from hipp.controller.files import load_controller
    from hipp.query.bound import load_base
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    model = load_model("ViT-B-32", seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    print_ = fingerprint(model)
    assert fingerprint(load_model("ViT-B-32", seed=6)) != print_
    Controller(make_prunable(model, 64), hidden=8, rank=2).save(
        tmp_path, fingerprint=print_, extra={"base_model": "ViT-B-32", "pretrained": None, "channel_group": 64,
                                             "train_config": asdict(TrainConfig(model="ViT-B-32", seed=5))})
    assert load_base(load_controller(tmp_path), tmp_path).fingerprint == print_
