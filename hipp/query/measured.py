"""A latency bound met as measured, not only as predicted: the bound query's plan is materialised and
timed against the dense materialisation on this machine (hipp.evaluation.profile.measure_export); where
the measured ratio misses the bound by more than `tolerance`, the query is asked again with the bound
scaled by bound / measured, so the latency model's error on plans of that size is divided out
(HALP and NViT fit their tables once; a deployed plan is what a user times). The plan whose measured
ratio is closest to the bound without passing it by more than `tolerance` is kept; every try is
recorded in plan.meta["latency_calibration"].

It costs one bound query and one timing per try: seconds on the embedded teacher, more on a large
model, which is why it is asked for (`--calibrate-latency`), not always done.
"""
from __future__ import annotations

from ..errors import HippError

TRIES = 3
TOLERANCE = 0.05  # half the 10% a bound is judged by: a re-measurement of the same plan varies by a few %


def calibrated_plan(query, base, latency, bound: float, tries: int = TRIES, tolerance: float = TOLERANCE):
    """`query(bound) -> Plan` is the bound query at a latency-ratio bound; returns the kept plan."""
    from ..evaluation.profile import measure_export
    from ..export.slicing import materialize

    if base is None or latency is None:
        raise HippError("--calibrate-latency needs the base model and a latency profile to time plans with")
    if latency.profile.get("device_type", "cpu") == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise HippError("--calibrate-latency: the latency profile is for a CUDA device; this machine has none")
    asked, record, plans = bound, [], []
    for _ in range(tries):
        plan = query(asked)
        report = latency.plan_report(plan)
        measured = measure_export(base.model, plan.space, materialize(base.model, plan).eval(), report)["measured_ratio"]
        record.append({"asked": asked, "predicted_ratio": report["predicted_ratio"], "measured_ratio": measured})
        plans.append(plan)
        if abs(measured / bound - 1) <= tolerance:
            break
        nxt = min(1.0, asked * bound / measured)
        if abs(nxt - asked) < 1e-4:
            break
        asked = nxt
    got = [r["measured_ratio"] for r in record]
    fits = [i for i, m in enumerate(got) if m <= bound * (1 + tolerance)]
    # the closest that fits; if none does, the fastest tried
    keep = min(fits, key=lambda i: abs(got[i] - bound)) if fits else min(range(len(got)), key=got.__getitem__)
    plan = plans[keep]
    plan.meta["max_latency"] = bound  # the user's bound, not the corrected one the search was given
    plan.meta["latency_calibration"] = {"bound": bound, "tolerance": tolerance, "tries": record, "kept": keep}
    return plan
