"""Everything before the first trial: the Plan from the flags (or the experiment's manifest), the model resolved once,
the disk the plan needs against what is free, the clips checked and the feature cache built. Each step fails in one
line on what a user can fix, before anything is written. Locally all of it runs in the driver, before Ray starts; on a
cluster (connected, the plan settled on its nodes) each node that runs trials checks itself and builds its own cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from typing import Any

from ..errors import AstCvError
from ..store.experiment import EPOCH, binding_manifest, parse_rows, rows_from_checkpoint, trial_params
from ..store.footprint import Footprint, Need, cache_bytes, check_space
from .cluster import check_resume_address
from .plan import (
    Plan,
    build_grid,
    config_values,
    continued_values,
    experiment_location,
    finish,
    first_config,
    plan_resources,
    requested,
    split_space,
    with_demo_defaults,
)
from ..store.storage import Store, human_bytes


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _resolve_frames(values: dict[str, Any], meta) -> Any:
    """Replace num_frames 'auto' by the count that holds the clips; returns the file headers read (or None)."""
    from ..data.audio import choose_num_frames, describe_cut, long_input_warning, read_headers

    headers = None
    if values.get("num_frames") == "auto":
        headers = read_headers(values["data_root"], meta)
        choice = choose_num_frames(headers.seconds)
        values["num_frames"] = choice.frames
        print(f"--num-frames auto: {choice.frames} frames hold the clips", flush=True)
        if choice.cut:
            warn(describe_cut(choice.cut, choice.frames))
    long = long_input_warning(int(values["num_frames"]))
    if long:
        warn(long)
    return headers


def make_plan(args: argparse.Namespace, spaces: dict[str, Any], torch_gpus: int, gpu_memory_gib: float | None = None):
    """(Plan without the pre-run check's results, validated metadata rows, file headers if read) from the arguments.

    A new experiment takes its settings from the flags; an existing one (re-run, or --resume) from its manifest, with
    the changes ``plan.continued_values`` allows. The model is resolved here (a hub id is fetched once).
    """
    from ..data.metadata import class_names, load_metadata
    from ..fit.model import resolve_model

    args, demo = with_demo_defaults(args)
    storage, name, exp_dir = experiment_location(args.storage_path, args.name, args.space)
    store = Store.open(exp_dir)
    manifest = binding_manifest(store)
    if args.resume and manifest is None:
        raise AstCvError(f"--resume: no experiment to resume at {exp_dir}. Check --storage-path and --name.")
    if args.space and args.space not in spaces:
        raise AstCvError(f"--space {args.space!r} is not one of {sorted(spaces)}.")
    space = spaces[args.space or "card"]
    if manifest is None:
        grid, fixed, folds = build_grid(space, args)
        values, added = config_values(fixed, demo, args, folds), list(grid["test_fold"])
    else:
        fixed, space_grid = split_space(space) if args.space else ({}, None)
        fixed.pop("folds", None)  # a space's own folds: --folds (checked against the record) or the recorded ones
        values, grid, added = continued_values(manifest, requested(fixed, demo, args), args, space_grid, exp_dir)
        check_resume_address(manifest, args.address, exp_dir)
    resources = plan_resources(args, torch_gpus, gpu_memory_gib=gpu_memory_gib)
    model_dir = resolve_model(values["model"])  # an unreachable hub or a typo: one line now, not 3 failures per trial
    meta = load_metadata(values["data_root"], values["folds"])
    headers = _resolve_frames(values, meta)
    config = first_config(values, grid, resources)
    plan = Plan(config=config, grid=grid, exp_dir=exp_dir, storage_path=storage, name=name, resources=resources,
                classes=class_names(meta), restore=manifest is not None, new_test_folds=tuple(added), model_dir=model_dir)
    return plan, meta, headers


def prepare_inputs(plan: Plan, meta, headers) -> Plan:
    """Build the feature cache (or, without it, decode every clip) before any trial starts; the final Plan.

    Clips that cannot be used (empty, corrupt, NaN/inf samples) are left out of every trial, listed here and in the
    report; recordings (fsIDs) in several folds are listed too.
    """
    from ..data.metadata import clip_id, recordings_in_several_folds

    if plan.resources.address is not None:
        bad = _prepare_on_nodes(plan, meta)
    elif plan.config.feature_cache:
        from ..data.cache import FeatureCache

        cache = FeatureCache.open(plan.config, meta)
        print(f"Feature cache: {cache.path} ({len(cache.index)} clips, {plan.config.num_frames} frames)", flush=True)
        bad = dict(cache.excluded)
    else:
        from ..data.audio import find_unusable

        bad = find_unusable(plan.config.data_root, meta, headers)
    if bad:
        warn(f"{len(bad)} clip(s) cannot be used and are left out of every trial (listed in the report):")
        for clip, reason in sorted(bad.items())[:5]:
            print(f"  {clip}: {reason}", file=sys.stderr)
    shared = recordings_in_several_folds(meta)
    if shared:
        warn(f"{len(shared)} recording(s) have clips in several folds; the official folds are kept (results stay "
             f"comparable with published ones) and the report lists them: "
             + "; ".join(f"fsID {fs} in folds {', '.join(map(str, fl))}" for fs, fl in sorted(shared.items())))
    usable = [int(f) for f, n in zip(meta["fold"], meta["slice_file_name"]) if clip_id(f, n) not in bad]
    return dataclasses.replace(plan, config=finish(plan.config, bad), skipped=bad, fsids_in_several_folds=shared,
                               fold_sizes={f: usable.count(f) for f in sorted(set(usable))})


def _prepare_on_nodes(plan: Plan, meta) -> dict[str, str]:
    """On a cluster: each node that runs trials builds its own feature cache (or decodes every clip) with its CPUs, the
    driver none; the clips that cannot be used, the same on every node."""
    from .preflight import NodeCheck, prepare_nodes

    what = "build the feature cache" if plan.config.feature_cache else "decode every clip (--no-cache)"
    print(f"The nodes that run trials {what}, each with its CPUs:", flush=True)
    lines, bad = prepare_nodes(NodeCheck(plan.exp_dir, plan.config, meta, plan.resources))
    for line in lines:
        print(f"  {line}", flush=True)
    return bad


def trials_finished(plan: Plan) -> set[str]:
    """Names of the experiment's trials that have reported their last epoch."""
    if not plan.restore:
        return set()
    finished = set()
    for name in plan.store.list_dirs():
        rows = parse_rows(plan.store.read_text(f"{name}/result.json"))
        params = trial_params(plan.store, name, rows)
        rows = rows_from_checkpoint(plan.store, name, rows)
        if params is not None and rows and rows[-1][EPOCH] >= int(params.get("epochs", plan.config.epochs)):
            finished.add(name)
    return finished


CACHE = "feature cache"


def footprint(plan: Plan, params: int, left: int, refit: bool) -> Footprint:
    """The disk of the ``left`` trials to run, as many at once as this machine or the cluster's nodes run (the plan's
    resources settled on them; all of them when that is not known)."""
    return Footprint(params=params, trials_left=left, at_once=plan.resources.slots() or left, epochs=plan.config.epochs,
                     keep=plan.config.keep_checkpoints, refit=refit)


def driver_needs(plan: Plan, fp: Footprint, meta) -> list[Need]:
    """The disk the driver checks: the experiment's peak at a local storage path; locally also the temporary
    checkpoints of the trials that run at once and the feature cache unless built (on a cluster those two are each
    node's, checked there: ``preflight.check_node``)."""
    needs = []
    if plan.resources.address is None:
        needs.append(Need(tempfile.gettempdir(), fp.temp_bytes, "temporary checkpoints"))
    if plan.store.local_path is not None:
        needs.append(Need(str(plan.store.local_path), fp.peak_bytes, "checkpoints"))
    if plan.resources.address is None and plan.config.feature_cache:
        from ..data.cache import cache_is_built

        if not cache_is_built(plan.config, meta):
            needs.append(Need(plan.config.feature_cache, cache_bytes(len(meta), plan.config.num_frames), CACHE))
    return needs


def preflight(plan: Plan, meta, refit: bool, override: bool) -> Plan:
    """Print the disk the trials left need (at the peak and at the end, for the trials that run at once) and what is
    free at the storage path, the cache and the temporary folder; refuse in one line when it does not fit
    (``override``: warn and go on). On a cluster the temporary folder and the cache are each node's, checked there
    with the rest of what its trials need (``preflight.check_node``)."""
    from ..fit.model import count_parameters

    params = count_parameters(plan.model_dir, len(plan.classes), plan.config.num_frames)
    finished = trials_finished(plan)
    left = plan.trials - len(finished)
    cluster = plan.resources.address is not None
    fp = footprint(plan, params, left, refit)
    store_free = plan.store.free_bytes()
    print(f"Disk: {left} trial(s) to run, {min(fp.at_once, left)} at once{' on the cluster' * cluster}, AST with "
          f"{params / 1e6:.1f} M parameters, --keep-checkpoints {plan.config.keep_checkpoints}: the experiment grows by "
          f"about {human_bytes(fp.end_bytes)} ({human_bytes(fp.peak_bytes)} at its peak); {plan.exp_dir}: "
          + (f"{human_bytes(store_free)} free" if store_free is not None else "free space unknown (object storage)"),
          flush=True)
    needs = driver_needs(plan, fp, meta)
    if plan.config.feature_cache and (cluster or any(n.what == CACHE for n in needs)):
        print(f"Feature cache: {plan.config.feature_cache} will take about "
              f"{human_bytes(cache_bytes(len(meta), plan.config.num_frames))}"
              + " on each node that runs trials (where not built yet)" * cluster, flush=True)
    for line in check_space(needs, override):
        print(line, file=sys.stderr, flush=True)
    if cluster:
        from .preflight import NodeCheck, preflight_nodes

        check = NodeCheck(plan.exp_dir, plan.config, meta, plan.resources, fp.checkpoint_bytes, override,
                          trials_left=left)
        for line in preflight_nodes(check, plan.store):
            warn(line)
    return dataclasses.replace(plan, footprint=fp, finished=frozenset(finished))
