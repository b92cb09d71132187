"""Crash safety and ownership of outputs: kill -9 at random moments and inside saves, a full disk,
non-finite gradients, Ctrl-C, two runs on one folder, leftovers of killed saves, --overwrite."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hipp.storage import outputs
from hipp.config import load_config
from hipp.errors import HippError
from hipp.training.resume import STATE_NAME
from hipp.training.trainer import TrainConfig, TrainingDiverged, train
from test_trainer import write_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS = 12
LONG = 24


def _cmd(*args):
    return [sys.executable, "-m", "hipp", *map(str, args)]


def _weights(out: Path) -> dict:
    return load_file(str(out / "controller.safetensors"))


def _interruptible() -> None:
    """Run in the child before the command starts: a job a shell starts in the background ignores Ctrl-C,
    and its children inherit that, so the command gets the default a user's terminal gives it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _log_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def _assert_consistent(out: Path) -> None:
    """What a kill leaves must load: the controller a query would read, the state a resume would."""
    from hipp.controller.files import load_controller
    from hipp.training.resume import load
    if (out / "controller.json").exists():
        load_controller(out)
    if (out / STATE_NAME).exists():
        load(out / STATE_NAME)


def _finish(cfg_path: Path, out: Path) -> None:
    """Resume after a kill (or start, when the kill came before the run had written anything), through
    the command line's own entry point but in this process: what a kill leaves is what is tested, and
    a second interpreter start would only add its import time."""
    from hipp.cli.main import main
    args = ["train", "--config", str(cfg_path)] + (["--resume"] if (out / STATE_NAME).exists() else [])
    assert main(args) == 0


def _uninterrupted(tiny_model_dir, tmp_path_factory, steps: int, save_every: int) -> Path:
    """The uninterrupted run every interrupted one must reproduce, tensor for tensor."""
    tmp = tmp_path_factory.mktemp("straight")
    cfg = load_config(TrainConfig, write_config(tmp, tiny_model_dir, steps=steps, save_every=save_every,
                                                lr_schedule="cosine"))
    train(cfg)
    return Path(cfg.output)


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    return _uninterrupted(tiny_model_dir, tmp_path_factory, STEPS, 2)


def _wait_for_step(out: Path, step: int, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if (out / "train_log.jsonl").exists() and len(_log_steps_so_far(out)) >= step:
            return
        time.sleep(0.02)


def _log_steps_so_far(out: Path) -> list[str]:
    return [line for line in (out / "train_log.jsonl").read_text().split("\n")[:-1]]


@pytest.fixture(scope="module")
def long_straight(tiny_model_dir, tmp_path_factory):
    return _uninterrupted(tiny_model_dir, tmp_path_factory, LONG, 3)


def test_kill_9_at_three_random_moments_then_resume_equals_an_uninterrupted_run(long_straight, tiny_model_dir,
                                                                                tmp_path):
    """One kill during start-up, two at random steps (a random fraction of a step after one ends), each
    followed by --resume; saves come every 3 steps, so most kills lose steps that must be redone."""
    cfg_path = write_config(tmp_path, tiny_model_dir, steps=LONG, save_every=3, lr_schedule="cosine")
    out = tmp_path / "out"
    rng, reached = random.Random(17), []
    targets = [None] + sorted(rng.sample(range(2, LONG - 2), 2))
    for target in targets:
        resume = ["--resume"] if (out / STATE_NAME).exists() else []
        proc = subprocess.Popen(_cmd("train", "--config", cfg_path, *resume),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        if target is None:
            time.sleep(rng.uniform(0.5, 2.5))  # while it imports and loads
        else:
            _wait_for_step(out, target, proc)
            time.sleep(rng.uniform(0.0, 0.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _assert_consistent(out)
        reached.append(len(_log_steps_so_far(out)) if (out / "train_log.jsonl").exists() else None)
    assert sum(1 for r in reached if r is not None and 0 < r < LONG) >= 2, reached  # kills came mid-training
    _finish(cfg_path, out)
    a, b = _weights(long_straight), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _log_steps(out) == list(range(1, LONG + 1))  # each step once, whatever the kills cut


_KILL_AT_REPLACE = """
import os, signal, sys
n, seen = int(sys.argv[1]), [0]
real = os.replace
def replace(src, dst):
    seen[0] += 1
    if seen[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = replace
from hipp.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("nth", [3, 5, 9])
def test_kill_9_inside_a_save_then_resume_equals_an_uninterrupted_run(straight, tiny_model_dir, tmp_path, nth):
    """The process kills itself at the nth rename: before the first controller file (3), before the log
    (5), before the state file of step 4 (9), so the resume starts from step 0, 0 and 2."""
    cfg_path = write_config(tmp_path, tiny_model_dir, steps=STEPS, save_every=2, lr_schedule="cosine")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", _KILL_AT_REPLACE, str(nth), "train", "--config", str(cfg_path)],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == -signal.SIGKILL
    assert any(p.name.endswith(".tmp") for p in out.iterdir())  # the killed write left its temp file
    _assert_consistent(out)
    _finish(cfg_path, out)
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())  # and the resumed run removed it
    a, b = _weights(straight), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _log_steps(out) == list(range(1, STEPS + 1))


def test_kill_9_inside_an_export_swap_leaves_the_old_export(tmp_path):
    """A kill between moving the old folder aside and moving the new one in: the next claim puts the old
    folder back, and a leftover temp folder is removed."""
    out = tmp_path / "export"
    with outputs.claim(out, "export"), outputs.staged(out, "export") as stage:
        (stage / "model.safetensors").write_bytes(b"old")
    script = ("import os, signal, sys\nfrom hipp.storage import outputs\nreal = os.rename\nn = [0]\n"
              "def rename(a, b):\n    n[0] += 1\n    real(a, b)\n"
              "    if n[0] == 1: os.kill(os.getpid(), signal.SIGKILL)\n"
              "os.rename = rename\nout = sys.argv[1]\n"
              "with outputs.claim(out, 'export'), outputs.staged(out, 'export') as s:\n"
              "    open(os.path.join(s, 'model.safetensors'), 'wb').write(b'new')\n")
    r = subprocess.run([sys.executable, "-c", script, str(out)], env=ENV, timeout=120)
    assert r.returncode == -signal.SIGKILL and not out.exists()
    with outputs.claim(out, "export"):
        assert (out / "model.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no lock, .old or temp folder left


def test_non_finite_gradients_stop_training_and_keep_the_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    from hipp.training.objectives import Objectives
    cfg = load_config(TrainConfig, write_config(tmp_path, tiny_model_dir))
    train(cfg, max_steps=2)
    good, state = _weights(tmp_path / "out"), (tmp_path / "out" / STATE_NAME).read_bytes()
    real = Objectives.scalarize
    # sqrt at 0 has an infinite slope: a finite loss (the same value) whose gradient is NaN
    monkeypatch.setattr(Objectives, "scalarize", lambda self, losses, pref: real(self, losses, pref)
                        + torch.sqrt(losses["flops"] * 0))
    with pytest.raises(TrainingDiverged, match=r"gradients became non-finite at step 3.*step 2"):
        train(cfg, resume=True)
    after = _weights(tmp_path / "out")
    assert all(torch.equal(good[k], after[k]) for k in good)
    assert (tmp_path / "out" / STATE_NAME).read_bytes() == state


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB filesystem (tmpfs), where root may mount one; skipped elsewhere."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_disk_is_one_line_and_keeps_the_previous_state(tiny_model_dir, tmp_path, small_disk):
    cfg_path = write_config(tmp_path, tiny_model_dir, steps=40, save_every=2, output=str(small_disk / "out"))
    from hipp.cli.main import main
    assert main(["train", "--config", str(cfg_path), "--max-steps", "2"]) == 0  # the refusal below needs a process
    out = small_disk / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # leave less room than one more state file needs
        try:
            f.write(b"\0" * (2 << 20))
        except OSError:
            pass
    r = subprocess.run(_cmd("train", "--config", cfg_path, "--resume"), capture_output=True, text=True,
                       env=ENV, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "disk is full" in lines[0], r.stderr
    for name in ("controller.safetensors", "controller.json", STATE_NAME):
        assert (out / name).read_bytes() == before[name]
    filler.unlink()
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())


def test_ctrl_c_exits_130_without_a_traceback(tiny_model_dir, tmp_path):
    cfg_path = write_config(tmp_path, tiny_model_dir, steps=400, save_every=50)
    proc = subprocess.Popen(_cmd("train", "--config", cfg_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, preexec_fn=_interruptible)
    log = tmp_path / "out" / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "hipp: interrupted"


def _torch_is_loading(pid: int) -> bool:
    """Whether one of torch's own libraries is mapped into the process (by file name: a folder named
    after torch somewhere on the path must not count)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except FileNotFoundError:  # the process has ended
        return False
    return any(Path(line.split()[-1]).name.startswith("libtorch") for line in maps.splitlines() if "/" in line)


@pytest.mark.skipif(not os.access("/proc/self/maps", os.R_OK), reason="reads the process's mapped libraries")
def test_ctrl_c_while_the_cli_starts_exits_130_without_a_traceback(tmp_path):
    """The package imports no torch, so even a Ctrl-C during the heavy imports reaches the CLI's handler."""
    # A folder that passes the cheap check, so the command goes on to import torch and open_clip; the
    # signal is sent once torch's library is mapped, i.e. inside the heavy imports, on any machine's speed.
    (tmp_path / "open_clip_config.json").write_text('{"model_cfg": {}}')
    proc = subprocess.Popen(_cmd("eval", "--model", tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, preexec_fn=_interruptible)
    try:
        deadline = time.time() + 60
        while not _torch_is_loading(proc.pid) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the command ended before it imported torch"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["hipp: interrupted"]


def test_ctrl_c_after_the_answer_leaves_at_once_with_the_answers_status():
    """A Ctrl-C in the shutdown after a command answered (here from an exit hook, so it lands there on
    any machine) neither prints a traceback nor changes the status, and nothing more runs."""
    script = ("import atexit, os, signal, sys\n"
              "import hipp.cli.main as cli\n"
              "cli.main = lambda: 2\n"
              "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), print('still running', file=sys.stderr)))\n"
              "cli.entry()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and proc.stderr == "", proc.stderr


def test_resume_refuses_changed_settings_and_a_folder_without_state(tiny_model_dir, tmp_path):
    cfg = load_config(TrainConfig, write_config(tmp_path, tiny_model_dir))
    train(cfg, max_steps=2)
    out = Path(cfg.output)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for key, value in (("seed", 1), ("lr", 0.5), ("steps", 8)):
        changed = load_config(TrainConfig, write_config(tmp_path, tiny_model_dir, name=f"{key}.yaml", **{key: value}))
        with pytest.raises(HippError, match=f"settings changed, {key}: "):
            train(changed, resume=True)
    changed = load_config(TrainConfig, write_config(tmp_path, tiny_model_dir, name="d.yaml",
                                                    data={"batch_size": 4, "shape_fraction": 1.0, "negatives": 2}))
    with pytest.raises(HippError, match="settings changed, data.batch_size: 8 -> 4"):
        train(changed, resume=True)
    (out / STATE_NAME).unlink()  # a finished controller whose state is gone: --resume must not start over
    with pytest.raises(HippError, match="nothing to resume"):
        train(cfg, resume=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {k: v for k, v in before.items() if k != STATE_NAME}


def test_a_second_run_on_a_locked_folder_is_refused(tiny_model_dir, tmp_path):
    cfg = load_config(TrainConfig, write_config(tmp_path, tiny_model_dir))
    with outputs.claim(cfg.output, "train"):
        with pytest.raises(HippError, match="another hipp run is writing"):
            train(cfg)
    assert not Path(cfg.output).exists()
    train(cfg, max_steps=1)  # the lock is gone with its holder


def test_leftovers_of_killed_saves_never_block(tiny_model_dir, tmp_path):
    cfg = load_config(TrainConfig, write_config(tmp_path, tiny_model_dir))
    train(cfg, max_steps=1)
    out = Path(cfg.output)
    (out / ".controller.json.x1y2.tmp").write_text("torn")
    (tmp_path / ".out.hipp-tmp-abc").mkdir()
    (tmp_path / ".out.hipp-lock").write_text("")  # a killed run's lock file, not held by anyone
    train(cfg, resume=True, max_steps=2)
    assert not (out / ".controller.json.x1y2.tmp").exists() and not (tmp_path / ".out.hipp-tmp-abc").exists()
    assert _log_steps(out) == [1, 2]


def test_overwrite_is_needed_for_a_folder_another_command_or_the_user_wrote(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(HippError, match="not empty and was not written by this command"):
        outputs.check(mine, "pareto")
    with outputs.claim(mine, "pareto", overwrite=True), outputs.staged(mine, "pareto") as stage:
        (stage / "pareto.csv").write_text("a")
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "pareto.csv").read_text() == "a"
    assert outputs.written_by(mine) is None  # still the user's: the next run needs --overwrite again
    front = tmp_path / "front"
    with outputs.claim(front, "pareto"), outputs.staged(front, "pareto") as stage:
        (stage / "pareto.csv").write_text("a")
    with pytest.raises(HippError, match="was written by 'hipp pareto'"):
        outputs.check(front, "bench")
    report = tmp_path / "report"
    for text in ("first", "second"):  # a command's own folder is replaced whole, without --overwrite
        with outputs.claim(report, "bench"), outputs.staged(report, "bench") as stage:
            (stage / "bench.md").write_text(text)
    assert (report / "bench.md").read_text() == "second"
    assert sorted(os.listdir(report)) == [outputs.MARKER, "bench.md"]


def test_teacher_pretraining_resumes_exactly_from_its_safetensors_state(tmp_path, monkeypatch):
    from conftest import TINY_CFG
    from train import teacher as pretrain
    from hipp.storage.checkpoint import WEIGHTS_NAME

    def cfg(out, **over):
        return pretrain.TeacherConfig(model={**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "image_size": 64}},
                                      output=str(tmp_path / out), steps=4, batch_size=8, warmup_steps=1,
                                      eval_every=0, save_every=2, **over)

    class Killed(Exception):
        pass
    pretrain.train_teacher(cfg("straight"))
    real = pretrain.resume_state.save

    def save_then_die(path, module, opt, meta):
        real(path, module, opt, meta)
        if meta["step"] == 2:
            raise Killed
    monkeypatch.setattr(pretrain.resume_state, "save", save_then_die)
    with pytest.raises(Killed):
        pretrain.train_teacher(cfg("resumed"))
    monkeypatch.setattr(pretrain.resume_state, "save", real)
    with pytest.raises(HippError, match="settings changed, lr: "):
        pretrain.train_teacher(cfg("resumed", lr=0.5), resume=True)
    pretrain.train_teacher(cfg("resumed"), resume=True)
    a, b = (load_file(str(tmp_path / d / WEIGHTS_NAME)) for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _log_steps(tmp_path / "resumed") == [1, 2, 3, 4]


def test_a_plain_rerun_after_overwrite_keeps_the_users_files(tmp_path):
    """--overwrite writes into a user's folder without making it the command's: the next run without
    --overwrite is refused, and no run removes a file the command did not write."""
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with outputs.claim(mine, "export", overwrite=True), outputs.staged(mine, "export") as stage:
        (stage / "model.safetensors").write_text("a")
    assert outputs.written_by(mine) is None and (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(HippError, match="not empty"):
        outputs.check(mine, "export")
    own = tmp_path / "own"  # the command's own folder, to which the user later added a file
    with outputs.claim(own, "export"), outputs.staged(own, "export") as stage:
        (stage / "model.safetensors").write_text("a")
    (own / "notes.txt").write_text("keep me too")
    with outputs.claim(own, "export"), outputs.staged(own, "export") as stage:
        (stage / "model.safetensors").write_text("b")
    assert (own / "notes.txt").read_text() == "keep me too" and (own / "model.safetensors").read_text() == "b"


def test_dot_and_a_symlink_name_the_folder_itself(tmp_path, monkeypatch):
    real = tmp_path / "real"
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    for _ in range(2):
        with outputs.claim(tmp_path / "link", "pareto"), outputs.staged(tmp_path / "link", "pareto") as stage:
            (stage / "pareto.md").write_text("x")
    assert (tmp_path / "link").is_symlink() and (real / "pareto.md").read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    with outputs.claim(".", "bench"), outputs.staged(".", "bench") as stage:
        (stage / "bench.md").write_text("y")
    assert sorted(os.listdir(empty)) == [outputs.MARKER, "bench.md"]


def test_resume_is_exact_when_a_run_stopped_inside_a_gradient_accumulation_window(tiny_model_dir, tmp_path):
    """With grad_accum 2 a run stopped at step 3 has half a window of gradients that no state holds: the
    state stays at step 2, and the resumed run equals an uninterrupted one."""
    def cfg(name):
        return load_config(TrainConfig, write_config(tmp_path, tiny_model_dir, name=f"{name}.yaml", steps=6,
                                                     save_every=2, grad_accum=2, output=str(tmp_path / name)))
    train(cfg("straight"))
    train(cfg("resumed"), max_steps=3)
    from hipp.training.resume import load
    assert load(tmp_path / "resumed" / STATE_NAME)[2]["step"] == 2
    train(cfg("resumed"), resume=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_malformed_state_file_is_one_line(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file
    cfg = load_config(TrainConfig, write_config(tmp_path, tiny_model_dir))
    train(cfg, max_steps=1)
    state = Path(cfg.output) / STATE_NAME
    for meta in ({"hipp": json.dumps({"format": "hipp-train-state", "version": 1, "step": "x"})},
                 {"hipp": json.dumps({"format": "hipp-train-state", "version": 1, "step": 1, "seconds": 0,
                                      "param_groups": [], "optimizer_scalars": []})},
                 {"hipp": "[1, 2]"}, {}):
        save_file({"optimizer.x": torch.zeros(1)}, str(state), metadata=meta)
        with pytest.raises(HippError, match="holds no (valid )?HiPP training state"):
            train(cfg, resume=True)
