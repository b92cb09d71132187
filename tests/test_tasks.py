"""Tasks: the embedded one changes no number; a user's CSV trains a controller; bad task settings are
one line at config load."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from hipp.baselines.calibration import CALIBRATION_SEED, make_calibration
from hipp.data.mixed import MixedBatches
from hipp.errors import HippError
from hipp.storage.checkpoint import get_tokenizer, load_model, preprocess_cfg
from hipp.tasks import DEFAULT_TASK, TASKS, get_task
from hipp.tasks.embedded import EmbeddedTask

BASE = {"channel_group": 16, "seed": 0, "steps": 2, "pref_groups": 2, "save_every": 2, "lr": 1.0e-2,
        "controller": {"hidden": 16, "rank": 4}, "data": {"batch_size": 4}}
CSV_ROWS, HELD = 12, 4


def same_batch(a, b) -> bool:
    return (torch.equal(a.images, b.images) and a.captions == b.captions and a.groups == b.groups
            and a.negatives == b.negatives and (a.n_shapes, a.n_negatives) == (b.n_shapes, b.n_negatives))


@pytest.fixture
def pairs(tmp_path):
    """A CSV of CSV_ROWS generated image-caption pairs, one colour and size of square per row."""
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    lines = ["filepath,title"]
    for i in range(CSV_ROWS):
        pixels = np.full((40, 48, 3), 255, dtype=np.uint8)
        colour = rng.integers(0, 256, 3)
        side = 8 + 2 * i
        pixels[4:4 + side, 4:4 + side] = colour
        Image.fromarray(pixels).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,a square of colour {' '.join(map(str, colour))} and side {side}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "pairs.csv"


def csv_options(path, **over):
    return {"path": str(path), "calibration_rows": HELD, **over}


# --- the embedded task is what came before ----------------------------------------------------------

def test_the_embedded_task_draws_the_batches_mixed_batches_drew():
    task = get_task(DEFAULT_TASK)
    for seed, fraction, negatives in ((1, 0.5, 2), (8, 1.0, 1), (3, 0.25, 0)):
        batches = task.batches(seed, 8, 32, shape_fraction=fraction, negatives=negatives)
        old = MixedBatches(seed, 8, fraction, negatives, 32)
        for index in (0, 5, 10**7):
            assert same_batch(batches(index), old(index))


def test_the_embedded_calibration_is_the_old_batch(tiny_model_dir):
    model = load_model(tiny_model_dir)
    cal = make_calibration(model, get_tokenizer(tiny_model_dir), preprocess_cfg(model), size=12)
    assert same_batch(cal.batch, MixedBatches(CALIBRATION_SEED, 12, 0.5, 1, 32)(0))
    assert cal.task.name == DEFAULT_TASK and cal.seed == CALIBRATION_SEED


def test_the_trainer_gives_the_controller_of_mixed_batches(tiny_model_dir, tmp_path, monkeypatch):
    """The run through the task vs the same run with the trainer's batches built as before tasks."""
    import hipp.training.trainer as trainer
    from hipp.config import load_config

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**BASE, "model": str(tiny_model_dir), "output": str(tmp_path / "new"),
                                    "data": {"batch_size": 4, "shape_fraction": 0.5, "negatives": 2}}))
    cfg = load_config(trainer.TrainConfig, path)
    assert cfg.task == DEFAULT_TASK
    trainer.train(cfg)

    class Before(EmbeddedTask):  # the trainer's line before tasks, whatever the trainer passes now
        def batches(self, *args, **kwargs):
            return MixedBatches(cfg.seed + 1, cfg.data.batch_size, cfg.data.shape_fraction, cfg.data.negatives, 32)

    monkeypatch.setattr(trainer, "get_task", lambda name, options: Before({}))
    cfg.output = str(tmp_path / "old")
    trainer.train(cfg)
    a, b = (load_file(str(tmp_path / d / "controller.safetensors")) for d in ("new", "old"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- a CSV task ------------------------------------------------------------------------------------

def test_csv_batches_are_a_function_of_seed_and_index_and_skip_the_held_out_rows(pairs):
    task, again = get_task("csv", csv_options(pairs)), get_task("csv", csv_options(pairs))
    assert len(task.train_items) == CSV_ROWS - HELD and len(task.held_out) == HELD
    held = {caption for _, caption in task.held_out}
    a, b = task.batches(3, 4, 32), again.batches(3, 4, 32)
    for index in (5, 0, 1, 10**7):  # out of order: nothing depends on what was asked before
        assert same_batch(a(index), b(index))
    first = a(0)
    assert first.images.dtype == torch.uint8 and first.images.shape == (4, 3, 32, 32)
    assert (first.n_shapes, first.n_negatives, first.negatives) == (0, 0, [])
    epoch = [c for i in range(2) for c in a(i).captions]  # 8 training rows, 4 a batch: one epoch
    assert sorted(epoch) == sorted(c for _, c in task.train_items) and not held & set(epoch)
    assert a(0).captions != task.batches(4, 4, 32)(0).captions  # another seed, another order
    cal = task.calibration_batch(32, 64, seed=0)
    assert cal.captions == [c for _, c in task.held_out] and cal.n_shapes == 0


def test_csv_metrics_utility_and_gate_training(pairs, tiny_model_dir):
    from hipp.backends import make_prunable
    from hipp.baselines.fixed_budget import GateTraining, train_gates

    model, task = load_model(tiny_model_dir), get_task("csv", csv_options(pairs))
    tokenizer, pp = get_tokenizer(tiny_model_dir), preprocess_cfg(model)
    metrics = task.metrics(model, tokenizer, pp)
    assert set(metrics) == set(task.utility_keys) == {"csv/i2t_r1", "csv/t2i_r1", "csv/i2t_r5", "csv/t2i_r5"}
    assert task.utility(metrics) == pytest.approx(sum(metrics.values()) / 4)
    assert metrics["csv/i2t_r5"] == 1.0  # 4 held-out rows: every match is within the top 5
    cal = make_calibration(model, tokenizer, pp, task=task)
    assert cal.size == HELD and not cal.batch.negatives
    gates, info = train_gates(model, make_prunable(model, 16), cal, 0.5, cfg=GateTraining(steps=2, batch_size=4))
    assert info["steps"] == 2 and 0 < info["expected_flops"] <= 1
    with pytest.raises(HippError, match="no grounding loss"):  # a task without negatives has only utility to weigh
        train_gates(model, make_prunable(model, 16), cal, 0.5, cfg=GateTraining(steps=2, batch_size=4, utility_weight=0.0))


def hipp_cli(*args):
    return subprocess.run([sys.executable, "-m", "hipp", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_controller_trains_on_a_csv_through_the_cli(pairs, tiny_model_dir, tmp_path):
    from hipp.controller.files import load_controller

    config = tmp_path / "csv.yaml"
    config.write_text(yaml.safe_dump({**BASE, "model": str(tiny_model_dir), "output": str(tmp_path / "out"),
                                      "task": "csv", "task_options": csv_options(pairs),
                                      "objectives": {"names": ["utility", "flops"]}}))
    r = hipp_cli("train", "--config", str(config))
    assert r.returncode == 0, r.stderr[-3000:]
    ctrl = load_controller(tmp_path / "out")
    saved = ctrl.extra["train_config"]
    assert saved["task"] == "csv" and saved["task_options"] == csv_options(pairs)
    assert list(ctrl.objective_names) == ["utility", "flops"]
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert "utility_hard" in summary["end_of_training"] and "grounding_hard" not in summary["end_of_training"]
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(np.isfinite(row["loss"]) for row in log)


# --- bad task settings: one line, exit status 2, before any model loads ------------------------------

def test_bad_task_settings_are_one_line(pairs, tmp_path, capsys):
    from hipp.cli.main import main

    def refused(needle, **over):
        config = tmp_path / "bad.yaml"
        # a model that does not exist: the refusal must come before anything loads
        config.write_text(yaml.safe_dump({**BASE, "model": str(tmp_path / "no-model"), "output": str(tmp_path / "o"),
                                          **over}))
        code = main(["train", "--config", str(config)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], err

    refused("unknown task 'imagenet'; choose from csv, instruct, shapes-fmnist", task="imagenet")
    refused("task 'csv' has no hard-negative captions, so it cannot train the grounding objective",
            task="csv", task_options=csv_options(pairs))  # the default objectives include grounding
    grounding_off = {"objectives": {"names": ["utility", "flops"]}, "task": "csv"}
    refused("needs the option task_options.path", **grounding_off)
    refused("task 'csv' has no option 'csv'", task_options={"csv": str(pairs)}, **grounding_off)
    refused("task_options.calibration_rows must be int or null, got True",
            task_options=csv_options(pairs, calibration_rows=True), **grounding_off)
    refused("leaves fewer than 2 to train on", task_options=csv_options(pairs, calibration_rows=11), **grounding_off)
    refused("needs columns 'image' and 'title'", task_options=csv_options(pairs, image_column="image"),
            **grounding_off)
    refused("CSV file not found", task_options=csv_options(tmp_path / "none.csv"), **grounding_off)
    refused("task 'shapes-fmnist' has no option 'path'; it takes none", task_options={"path": "x"})


def test_registry():
    assert {"shapes-fmnist", "csv"} <= set(TASKS)
    with pytest.raises(HippError, match="unknown task 'x'"):
        get_task("x")
