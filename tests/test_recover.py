"""hipp recover: distillation of an export from its base, an ordinary export out, exact resume after
kill -9, and one line for bad input."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hipp import load_model
from hipp.cli.main import main
from hipp.storage.checkpoint import PRUNED_CONFIG_NAME, PRUNED_WEIGHTS_NAME
from hipp.storage.fileio import load_tensors
from hipp.recovery.loop import BEST_NAME, LOG_NAME, is_better
from hipp.training.resume import STATE_NAME
from test_crash_safety import ENV
from test_query import PREFS, assert_bad, cli, tiny_controller_dir  # noqa: F401

STEPS = 6
CONFIG = (f"steps: {STEPS}\nbatch_size: 8\neval_every: 2\nval_size: 10\nsave_every: 2\nwarmup_steps: 1\n"
          "patience: 0\nlr: 1.0e-3\n")


@pytest.fixture(scope="module")
def export_dir(tiny_controller_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("recover") / "export"
    assert main(["export", "--controller", str(tiny_controller_dir), "--pref", PREFS["partial"], "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("recover-config") / "recover.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def straight(export_dir, config, tmp_path_factory):
    """An uninterrupted run, in a process of its own with the thread count the killed run below gets
    (float sums, and so the weights, depend on it)."""
    out = tmp_path_factory.mktemp("recover-run") / "out"
    r = subprocess.run([sys.executable, "-m", "hipp", "recover", "--model", str(export_dir), "--config", str(config),
                        "--out", str(out), "--json"], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    return out


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]


def test_a_recovered_export_is_an_ordinary_export_of_the_best_weights(export_dir, straight):
    before, after = load_model(export_dir), load_model(straight)
    assert type(after) is type(before)
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(after) == shapes(before)  # the plan's structure is kept
    config = json.loads((straight / PRUNED_CONFIG_NAME).read_text())
    recovery = config["recovery"]
    assert recovery["steps_run"] == STEPS and not recovery["stopped_early"]
    assert recovery["val_utility_after"] >= recovery["val_utility_before"]
    rows = _log(straight)
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    vals = {r["step"]: r["val_utility"] for r in rows if "val_utility" in r}
    ground = {r["step"]: r["val_grounding"] for r in rows if "val_utility" in r}
    assert set(vals) == set(ground) == {0, 2, 4, 6} and recovery["best_step"] in vals
    kept = {s: u for s, u in vals.items() if ground[s] >= ground[0] - 0.01}  # keep_grounding, its default tolerance
    assert vals[recovery["best_step"]] == max(kept.values()) == recovery["val_utility_after"]
    assert recovery["val_grounding_after"] == ground[recovery["best_step"]] >= recovery["val_grounding_before"] - 0.01
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows[1:])
    # the weights learnt: the last state differs from the export, and the export written is the best one
    last = {k.split(".", 1)[1]: v for k, v in load_tensors(straight / STATE_NAME).items() if k.startswith("controller.")}
    first = load_tensors(export_dir / PRUNED_WEIGHTS_NAME)
    assert any(not torch.equal(last[k], first[k]) for k in first)
    best, written = load_tensors(straight / BEST_NAME), load_tensors(straight / PRUNED_WEIGHTS_NAME)
    assert all(torch.equal(best[k], written[k]) for k in best)


def test_a_step_that_loses_grounding_is_never_the_best():
    best = {"step": 0, "utility": 0.80, "grounding_floor": 0.90}
    assert is_better({"val_utility": 0.85, "val_grounding": 0.90}, best, keep_grounding=True)
    assert not is_better({"val_utility": 0.85, "val_grounding": 0.89}, best, keep_grounding=True)
    assert is_better({"val_utility": 0.85, "val_grounding": 0.89}, best, keep_grounding=False)
    assert not is_better({"val_utility": 0.80, "val_grounding": 0.95}, best, keep_grounding=True)  # utility must rise
    assert is_better({"val_utility": 0.85}, {**best, "grounding_floor": None}, keep_grounding=True)  # no negatives
    assert is_better({"val_utility": 0.85, "val_grounding": 0.895}, best, True, tolerance=0.01)  # a tie
    assert not is_better({"val_utility": 0.85, "val_grounding": 0.885}, best, True, tolerance=0.01)


def test_kill_9_then_resume_ends_as_an_uninterrupted_run(export_dir, config, straight, tmp_path, one_thread):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hipp", "recover", "--model", str(export_dir), "--config", str(config),
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if (out / LOG_NAME).is_file() and len((out / LOG_NAME).read_text().splitlines()) >= 4:
            break  # step 3 done: the state holds step 2, so step 3 is redone after the resume
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / PRUNED_CONFIG_NAME).exists()  # killed before the end: no export yet
    assert main(cmd[3:] + ["--resume"]) == 0  # in this process, at the killed run's one thread
    for name in (PRUNED_WEIGHTS_NAME, STATE_NAME):
        a, b = load_tensors(straight / name), load_tensors(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["step"] for r in _log(out)] == list(range(STEPS + 1))  # each step once


def _edit_config(folder: Path, edit) -> None:
    path = folder / PRUNED_CONFIG_NAME
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_bad_input_is_one_line_and_writes_nothing(export_dir, config, tiny_controller_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    run = lambda model, *more: cli(capsys, "recover", "--model", model, "--out", out, *more)  # noqa: E731
    assert_bad(*run(tiny_controller_dir), "is not a HiPP export")
    assert_bad(*run(tmp_path / "nowhere"), "is not a HiPP export")
    no_base = shutil.copytree(export_dir, tmp_path / "no-base")
    _edit_config(no_base, lambda c: c["base"].update(model=str(tmp_path / "gone")))
    assert_bad(*run(no_base), "the export's base model")
    other = shutil.copytree(export_dir, tmp_path / "other")
    _edit_config(other, lambda c: c["base"].update(fingerprint="0" * 16))
    assert_bad(*run(other), "has weights fingerprint")
    assert_bad(*run(export_dir, "--out", export_dir), "another folder than the export")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: -1\n")
    assert_bad(*run(export_dir, "--config", bad), "lr")
    bad.write_text("negatives: 6\n")  # more than a one-object scene has: the batch would mix counts
    assert_bad(*run(export_dir, "--config", bad), "'negatives' must be in [0, 5]")
    bad.write_text("task: nope\n")
    assert_bad(*run(export_dir, "--config", bad), "unknown task")
    bad.write_text("grounding_mode: balanced\n")  # a generative model's yes / no weighing: no contrastive reading
    assert_bad(*run(export_dir, "--config", bad), "grounding_mode")
    bad.write_text("task: instruct\n")  # a LLaVA's recovery config
    assert_bad(*run(export_dir, "--config", bad), "serves generative models")
    assert_bad(*run(export_dir, "--resume"), "nothing to resume")
    assert not out.exists()
    # an existing folder of someone else's is not overwritten
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_bad(*run(export_dir, "--config", config), "not empty")
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


LAUNCHED = """
import sys
from accelerate import Accelerator
from safetensors.torch import save_file
from hipp.cli.main import main

held = []
prepare = Accelerator.prepare


def keep(self, *objects):
    prepared = prepare(self, *objects)
    held.append((self, prepared[0]))
    return prepared


Accelerator.prepare = keep
code = main(["recover", "--model", sys.argv[1], "--config", sys.argv[2], "--out", sys.argv[3]])
if code:
    sys.exit(code)
(acc, encoder), = held
final = {k: v.detach().clone().contiguous() for k, v in acc.unwrap_model(encoder).state_dict().items()}
save_file(final, f"{sys.argv[4]}/final{acc.process_index}of{acc.num_processes}.safetensors")
"""


def test_two_processes_recover_one_model(export_dir, config, tmp_path):
    """Under `accelerate launch` with two CPU processes, each on its own half of every batch, both
    processes end with the same weights (their gradients are averaged), and the main process writes
    the export. Unsynchronised gradients would leave two different models."""
    from safetensors.torch import load_file
    from test_trainer import free_port

    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(free_port())]
    out = tmp_path / "out"
    r = subprocess.run(accelerate + [str(script), str(export_dir), str(config), str(out), str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env={**ENV, "ACCELERATE_USE_CPU": "true"})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (load_file(str(tmp_path / f"final{i}of2.safetensors")) for i in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = load_tensors(export_dir / PRUNED_WEIGHTS_NAME)
    assert any(not torch.equal(a["model." + k], first[k]) for k in first)  # they learnt, together
    assert json.loads((out / PRUNED_CONFIG_NAME).read_text())["recovery"]["steps_run"] == STEPS
    assert load_model(out) is not None


def test_tensorboard_gets_the_logged_rows_too(export_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    config = tmp_path / "recover.yaml"
    config.write_text(CONFIG.replace(f"steps: {STEPS}", "steps: 2") + "tensorboard: true\n")
    out = tmp_path / "out"
    assert main(["recover", "--model", str(export_dir), "--config", str(config), "--out", str(out)]) == 0
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"loss", "val_utility"} <= scalars
    assert [e.step for e in acc.Scalars("loss")] == [1, 2] and len(_log(out)) == 3  # JSONL as before


def test_bench_adds_rows_after_n_recovery_steps(tiny_controller_dir, config, tmp_path, capsys):  # noqa: F811
    """The controller's plan and the best training-free plan at each budget, exported, recovered for
    N steps from the base and measured like every row; their margins are set side by side."""
    code, out, err = cli(capsys, "bench", "--controller", tiny_controller_dir, "--budgets", "0.5", "--methods",
                         "uniform,magnitude", "--test-items", 10, "--recover-steps", 2, "--recover-config", config,
                         "--out", tmp_path / "b", "--json")
    assert code == 0, err
    result = json.loads(out)
    rows = {r["method"]: r for r in result["results"]}
    free = max(("uniform", "magnitude"), key=lambda m: rows[m]["utility"])
    assert set(rows) == {"uniform", "magnitude", "hipp", "hipp+recovery", f"{free}+recovery"}
    for name in ("hipp", free):
        again = rows[f"{name}+recovery"]
        assert again["flops_ratio"] == rows[name]["flops_ratio"] and again["recovery"]["steps_run"] == 2
        assert again["utility"] != rows[name]["utility"] or again["recovery"]["best_step"] == 0
    assert f"vs_{free}+recovery" in result["margins"]["hipp+recovery"]["0.5"]


def test_bench_recovery_bad_input_is_one_line(tiny_controller_dir, config, tmp_path, capsys):  # noqa: F811
    assert_bad(*cli(capsys, "bench", "--controller", tiny_controller_dir, "--recover-steps", 0, "--out", tmp_path / "b"),
               "--recover-steps must be a whole number of at least 1")
    assert_bad(*cli(capsys, "bench", "--controller", tiny_controller_dir, "--recover-config", config,
                    "--out", tmp_path / "b"), "give --recover-steps too")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 2\nlr: -1\n")
    assert_bad(*cli(capsys, "bench", "--controller", tiny_controller_dir, "--recover-steps", 2, "--recover-config", bad,
                    "--out", tmp_path / "b"), "lr")
    assert not (tmp_path / "b").exists()
