"""Everything before the first trial, in the driver: the Plan from the flags (or the experiment's manifest), the model
resolved once, the clips checked and the feature cache built, and the disk the plan needs against what is free.
Each step fails in one line on what a user can fix, before Ray starts and before anything is written.
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

    if plan.config.feature_cache:
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


def preflight(plan: Plan, meta, refit: bool, override: bool) -> Plan:
    """Print the disk the trials left need (at the peak and at the end) and what is free at the storage path, the
    cache and the temporary folder; refuse in one line when it does not fit (``override``: warn and go on)."""
    from ..data.cache import cache_is_built
    from ..fit.model import count_parameters

    params = count_parameters(plan.model_dir, len(plan.classes), plan.config.num_frames)
    finished = trials_finished(plan)
    left = plan.trials - len(finished)
    fp = Footprint(params=params, trials_left=left, at_once=plan.resources.slots() or left, epochs=plan.config.epochs,
                   keep=plan.config.keep_checkpoints, refit=refit)
    store_free = plan.store.free_bytes()
    print(f"Disk: {left} trial(s) to run, AST with {params / 1e6:.1f} M parameters, --keep-checkpoints "
          f"{plan.config.keep_checkpoints}: the experiment grows by about {human_bytes(fp.end_bytes)} "
          f"({human_bytes(fp.peak_bytes)} at its peak); {plan.exp_dir}: "
          + (f"{human_bytes(store_free)} free" if store_free is not None else "free space unknown (object storage)"),
          flush=True)
    needs = [Need(tempfile.gettempdir(), fp.temp_bytes, "temporary checkpoints")]
    if plan.store.local_path is not None:
        needs.append(Need(str(plan.store.local_path), fp.peak_bytes, "checkpoints"))
    if plan.config.feature_cache and not cache_is_built(plan.config, meta):
        size = cache_bytes(len(meta), plan.config.num_frames)
        needs.append(Need(plan.config.feature_cache, size, "feature cache"))
        print(f"Feature cache: {plan.config.feature_cache} will take about {human_bytes(size)}", flush=True)
    for line in check_space(needs, override):
        print(line, file=sys.stderr, flush=True)
    return dataclasses.replace(plan, footprint=fp, finished=frozenset(finished))
