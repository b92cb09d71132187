"""`hipp query` and the plan behind `hipp export`: a preference or a cost bound from the command line,
the answer as JSON or as a table."""
from __future__ import annotations

from ..core.budget import check_bounds
from ..core.latency import latency_for, parse_bound
from ..controller.files import load_controller
from ..errors import HippError
from ..core.plan import Plan
from ..core.preference import format_spec
from ..query.bound import check_device, check_search, load_base, plan_for_budget
from ..query.rounding import check_rounding, round_preference_plan
from ..query.trade_off import plan_for_preference
from ..query.tokens import counts, parse_shares, token_level


def plan_from_args(args, need_base: bool = False):
    """(controller, plan, base or None) for --pref, a bound (--max-flops / --max-params / --max-latency) or
    both (the preference's quality split at the bound's cost: hipp/query/trade_off.py); bad input is a
    HippError."""
    latency_text = getattr(args, "max_latency", None)
    bounds = {"max_flops": getattr(args, "max_flops", None), "max_params": getattr(args, "max_params", None)}
    given = [k for k, v in bounds.items() if v is not None] + (["max_latency"] if latency_text is not None else [])
    if args.pref is None and not given:
        raise HippError("give --pref SPEC, --max-flops R, --max-params R or --max-latency R")
    if latency_text is not None:
        parse_bound(latency_text)  # the form of the number, before anything loads
    if getattr(args, "calibrate_latency", False) and latency_text is None:
        raise HippError("--calibrate-latency corrects a latency bound: give --max-latency too")
    if bounds["max_flops"] is not None or bounds["max_params"] is not None:
        check_bounds(bounds["max_flops"], bounds["max_params"])
    shares = getattr(args, "visual_tokens", None)
    if shares is not None:
        shares = parse_shares(shares)
        if not given:
            raise HippError("--visual-tokens needs a bound (--max-flops / --max-params): the weights are fitted to it")
        if latency_text is not None:
            raise HippError("a latency bound does not price visual tokens yet; bound FLOPs or params instead")
    elif getattr(args, "token_rule", None) is not None:
        raise HippError("--token-rule ranks the tokens --visual-tokens keeps; give --visual-tokens too")
    polish_steps = getattr(args, "polish", 0)
    if polish_steps:
        from ..query.polish import check_steps  # lazily: polishing needs open_clip, a preference query does not
        check_steps(polish_steps)
    if polish_steps and bounds["max_flops"] is None:
        raise HippError("--polish needs --max-flops (it holds a FLOPs bound)")
    if polish_steps and shares is not None:
        raise HippError("--polish does not take --visual-tokens yet")
    if polish_steps and (latency_text is not None or getattr(args, "round", None) or getattr(args, "round_heads", None)):
        # the polished plan is fitted again to the FLOPs / params bounds alone: a latency bound or a
        # rounding would be claimed in its meta and no longer hold
        raise HippError("--polish does not take --max-latency or --round yet (it refits to FLOPs / params bounds only)")
    if args.pref is not None and given and shares is not None:
        raise HippError("--visual-tokens goes with a bound query, not with --pref and a bound (the preference's "
                        "own plan at that cost)")
    search = {"n_rank": getattr(args, "candidates", None), "calib_n": getattr(args, "calib_images", None)}
    check_search(**search)
    device = getattr(args, "device", "cpu")
    check_device(device)  # before the controller and the model load
    controller = load_controller(args.controller)
    latency = latency_for(controller.space, getattr(args, "latency_profile", None),
                          controller.extra.get("latency_profile"))
    rounding = check_rounding(controller.space, getattr(args, "round", None), getattr(args, "round_heads", None))
    max_latency = None if latency_text is None else parse_bound(latency_text, latency)
    if max_latency is not None and latency is None:
        raise HippError("--max-latency needs a latency profile: give --latency-profile FILE (made by hipp profile)")
    calibrate = getattr(args, "calibrate_latency", False)
    if args.pref is not None:
        pref = controller.preference(args.pref)  # validates before anything heavy is loaded
        base = load_base(controller, args.controller, args.base_model, device) \
            if need_base or calibrate or polish_steps else None
        if not given:
            plan = controller.plan(pref) if rounding is None else round_preference_plan(controller, pref, rounding)
            if latency is not None:
                plan.meta["latency"] = latency.plan_report(plan)
            return controller, plan, base
        query = lambda bound: plan_for_preference(controller, pref, bounds["max_flops"], bounds["max_params"],  # noqa: E731
                                                  bound, latency, rounding)
    else:
        base = load_base(controller, args.controller, args.base_model, device)
        rule = getattr(args, "token_rule", None)
        token_counts = None if shares is None else counts(token_level(base.model, rule), shares)
        query = lambda bound: plan_for_budget(controller, bounds["max_flops"], bounds["max_params"], base,  # noqa: E731
                                              **search, max_latency=bound, latency=latency, rounding=rounding,
                                              token_counts=token_counts, token_rule=rule)
    if calibrate:
        from ..query.measured import calibrated_plan
        plan = calibrated_plan(query, base, latency, max_latency)
    else:
        plan = query(max_latency)
    if polish_steps:
        from ..query.polish import polish
        plan = polish(base, controller, plan, polish_steps)
    return controller, plan, base


def summary(plan: Plan) -> dict:
    """Plan.summary() plus the preference as a SPEC string (what `--pref` would take)."""
    out = plan.summary()
    out["preference_spec"] = format_spec(plan.preference)
    return out


def format_table(plan: Plan) -> str:
    s = summary(plan)
    lines = [f"preference    {s['preference_spec']}"]
    if "flops_target" in plan.meta:
        lines.append(f"flops target  {plan.meta['flops_target']:.3f} (the controller's target input)")
    bound = ", ".join(f"{k}={plan.meta[k]:g}" for k in ("max_flops", "max_params", "max_latency") if k in plan.meta)
    search = plan.meta.get("search")
    if search:
        loss = search["loss"]
        lines.append(f"chosen for    {bound}: logit offset {search['logit_offset']:+.3f}, "
                     f"{search['units_added']} units topped up"
                     + (f", loss {loss:.4f}" if loss is not None else "")
                     + f" (best of {len(search['candidates'])}, ranked by {search['ranked_by']})")
    trade = plan.meta.get("trade_off")
    if trade:
        lines.append(f"chosen for    {format_spec(trade['asked'])} within {bound}: cost weight "
                     f"{trade['cost_weight']:.3f}, logit offset {trade['offset']:+.3f}, "
                     f"{trade['added_by_top_up']} units topped up")
    polished = plan.meta.get("polish")
    if polished and polished.get("split") == "own":
        lines.append(f"polished      {polished['steps']} steps on the preference's split, {polished['seconds']:.0f} s")
    elif polished:
        lines.append(f"polished      {polished['steps']} steps: loss {polished['loss_before']:.4f} -> "
                     f"{polished['loss_after']:.4f}, {'kept' if polished['kept'] else 'not kept (worse)'}, "
                     f"{polished['seconds']:.0f} s")
    for kind in ("flops", "params"):
        per = ", ".join(f"{t} {s[t][f'{kind}_ratio']:.3f}" for t in plan.space.stages)
        lines.append(f"{kind + '_ratio':13s} {s[f'{kind}_ratio']:.4f}  ({per})")
    lat = plan.meta.get("latency")
    if lat:
        per = ", ".join(f"{n} {ms:.2f} ms" for n, ms in lat["predicted_ms"].items() if n != "latency")
        lines.append(f"{'latency':13s} {lat['predicted_ratio']:.4f}  (predicted {per} at batch {lat['batch']} "
                     f"on {lat['device']}, {lat['form']} model)")
    for level, kept in zip(plan.space.tokens, plan.token_keep.tolist()):
        lines.append(f"{'tokens':13s} {int(kept)}/{level.tokens} {level.stage} image tokens kept "
                     f"(ranked by {level.rule} attention)")
    if "round" in plan.meta:
        lines.append(f"{'rounded':13s} channels in multiples of {plan.meta['round']['channels']}, "
                     f"attention units of {plan.meta['round']['units']}")
    lines.append(f"{'tower':6s} {'layer':>5s}  {'kept':4s}  {'heads':>7s}  {'channels':>11s}")
    for t in plan.space.stages:
        specs = plan.space.tower_layers(t)
        for spec, kept, h, c in zip(specs, s[t]["layers_kept"], s[t]["heads_kept"], s[t]["channels_kept"]):
            lines.append(f"{t:6s} {spec.index:5d}  {'yes' if kept else 'no':4s}  {f'{h}/{spec.num_heads}':>7s}  "
                         f"{f'{c}/{spec.mlp_hidden}':>11s}")
    return "\n".join(lines)


def run(args) -> int:
    """`hipp query`."""
    import json

    _, plan, _ = plan_from_args(args)
    print(json.dumps(summary(plan)) if args.json else format_table(plan))
    return 0
