"""Recovery of a plan rather than of an export, for bench's "after N recovery steps" rows: the plan is
exported into a scratch folder, recovered from its base as `hipp recover` would, and loaded back."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from ..errors import HippError
from .loop import recover
from .settings import RecoverConfig


def bench_config(steps: int | None, path=None) -> RecoverConfig | None:
    """The recovery settings of bench's rows: `path`'s (None: the defaults) run for `steps` steps;
    None without steps."""
    if steps is None:
        if path is not None:
            raise HippError("--recover-config sets up the recovery rows; give --recover-steps too")
        return None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise HippError(f"--recover-steps must be a whole number of at least 1, got {steps!r}")
    from ..config import load_config
    cfg = load_config(RecoverConfig, path) if path is not None else RecoverConfig()
    return dataclasses.replace(cfg, steps=steps)


def recovered_from(base, cfg: RecoverConfig):
    """plan -> (the plan exported from `base` and recovered under `cfg`, loaded; its recovery record)."""
    from ..export.pruned import export_pruned
    from ..storage.checkpoint import load_model

    def run(plan):
        with tempfile.TemporaryDirectory(prefix="hipp-recovery-") as tmp:
            export_pruned(base, plan, Path(tmp) / "export")
            record = recover(Path(tmp) / "export", cfg, Path(tmp) / "recovered")
            return load_model(Path(tmp) / "recovered").eval(), {k: v for k, v in record.items() if k != "out"}
    return run
