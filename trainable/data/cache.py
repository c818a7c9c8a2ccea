"""Feature cache: every clip's normalized fbank computed once per dataset + feature settings, stored as a float16
memory-mapped array shared by all trials and folds.

The cache key hashes the feature recipe (frame count included) and the file list (fold, name, size; not the
modification time, so copies of the dataset on several nodes share one cache), so a changed setting or a file
added, removed or resized makes a new cache. Building is parallel, shows a progress bar, and holds a file lock so
that trials starting together build it once.

    python -m trainable.data.cache --data-root DIR --cache-dir DIR --num-frames 400
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from filelock import FileLock

from .audio import AudioError, clip_features, parallel_map
from ..cli import run_cli
from ..config import TrainConfig
from .metadata import audio_path, clip_id, label_indices, load_metadata
from .features import AUDIOSET_MEAN, AUDIOSET_STD, NUM_MEL_BINS, recipe_fingerprint

log = logging.getLogger(__name__)

FEATURES = "features.npy"
INDEX = "index.json"
STORE_DTYPE = np.float16  # half the bytes; |error| <= 2**-11 relative, ~1e-3 absolute on AST's normalized range


def _file_list(root: Path, meta: pd.DataFrame) -> list[tuple[int, str, int]]:
    out = []
    for fold, name in zip(meta["fold"], meta["slice_file_name"]):
        out.append((int(fold), str(name), audio_path(root, fold, name).stat().st_size))
    return sorted(out)


def cache_key(root: str | Path, meta: pd.DataFrame, num_frames: int) -> str:
    """Hash of the feature recipe, the frame count and the clip files (fold, name, size): the same for a copy of the
    dataset elsewhere (another node, a copy with new modification times)."""
    h = hashlib.sha256(recipe_fingerprint(num_frames, AUDIOSET_MEAN, AUDIOSET_STD).encode())
    h.update(json.dumps(_file_list(Path(root), meta)).encode())
    return h.hexdigest()[:20]


def _compute(args: tuple[str, int]) -> np.ndarray | str:
    """Features of one clip, or the reason it cannot be used (empty, corrupt, NaN/inf samples)."""
    path, num_frames = args
    torch.set_num_threads(1)
    try:
        return clip_features(path, num_frames).numpy().astype(STORE_DTYPE)
    except AudioError as exc:
        return str(exc).rstrip(".")


@dataclass
class FeatureCache:
    """A built cache: ``features[i]`` is the clip at ``index[(fold, name)] == i``."""

    path: Path
    index: dict[tuple[int, str], int]
    num_frames: int
    excluded: dict[str, str]  # clip id -> why it could not be featurized

    @classmethod
    def open(cls, config: TrainConfig, meta: pd.DataFrame, workers: int | None = None) -> "FeatureCache":
        """Open the cache for ``config``'s dataset and frame count under ``config.feature_cache``, building it first
        if needed with ``workers`` processes (default: every core). ``meta``: the validated metadata rows of the
        folds in use (``data.load_metadata``)."""
        path = cache_path(config, meta)
        cache_root = path.parent
        if not (path / INDEX).is_file():
            cache_root.mkdir(parents=True, exist_ok=True)
            with FileLock(str(path) + ".lock"):
                if not (path / INDEX).is_file():  # another process may have built it while we waited
                    build(path, config.data_root, meta, config.num_frames, workers)
        index = json.loads((path / INDEX).read_text())
        return cls(path, {(int(f), n): i for i, (f, n) in enumerate(index["clips"]) if not index["bad"][i]},
                   index["num_frames"], {clip_id(f, n): r for (f, n), r in zip(index["clips"], index["bad"]) if r})

    def array(self) -> np.ndarray:
        return np.load(self.path / FEATURES, mmap_mode="r")


def cache_path(config: TrainConfig, meta: pd.DataFrame) -> Path:
    """The folder of the cache for ``config``'s data and frame count (built or not)."""
    key = cache_key(config.data_root, meta, config.num_frames)
    return Path(config.feature_cache).expanduser() / f"{key}-f{config.num_frames}"


def cache_is_built(config: TrainConfig, meta: pd.DataFrame) -> bool:
    return (cache_path(config, meta) / INDEX).is_file()


def build(path: Path, data_root: str | Path, meta: pd.DataFrame, num_frames: int, workers: int | None = None) -> None:
    """Compute every clip's features in parallel into ``path``: written to a folder of this machine's own beside it,
    then renamed. Machines that share the cache folder (a cluster's NFS, where the file lock may not reach across them)
    never write into one another's files, and one that finds the cache built when it is done keeps that one (trials
    may have it open) and drops its own."""
    tmp = path.with_name(f"{path.name}.building-{socket.gethostname()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a build of this machine's that was killed (the lock is held: not running)
    tmp.mkdir(parents=True)
    workers = workers or max(1, (os.cpu_count() or 1))
    log.info("building the feature cache (%d clips, %d frames) in %s with %d processes", len(meta), num_frames, path, workers)
    try:
        _build_into(tmp, data_root, meta, num_frames, workers)
        if not (path / INDEX).is_file():
            try:
                tmp.rename(path)
            except OSError:
                if not (path / INDEX).is_file():  # not another machine's build that got there first
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_into(tmp: Path, data_root: str | Path, meta: pd.DataFrame, num_frames: int, workers: int) -> None:
    clips = sorted(zip(meta["fold"].astype(int), meta["slice_file_name"]))
    out = np.lib.format.open_memmap(tmp / FEATURES, mode="w+", dtype=STORE_DTYPE, shape=(len(clips), num_frames, NUM_MEL_BINS))
    jobs = [(str(audio_path(data_root, f, n)), num_frames) for f, n in clips]
    bad: list[str] = []
    for i, feats in enumerate(parallel_map(_compute, jobs, workers, "feature cache")):
        if isinstance(feats, str):
            log.warning("left out of the cache: %s (%s)", clip_id(*clips[i]), feats)
            bad.append(feats)
        else:
            out[i] = feats
            bad.append("")
    out.flush()
    del out
    (tmp / INDEX).write_text(json.dumps({"num_frames": num_frames, "dtype": np.dtype(STORE_DTYPE).name,
                                         "clips": [[int(f), str(n)] for f, n in clips], "bad": bad}))


class CachedDataset(torch.utils.data.Dataset):
    """Yields (features [num_frames, 128] float32, label index) from the cache; same items as ClipDataset."""

    def __init__(self, cache: FeatureCache, rows: pd.DataFrame, classes: Sequence[str]):
        self.cache_path = cache.path
        self.rows = np.asarray([cache.index[(int(f), n)] for f, n in zip(rows["fold"], rows["slice_file_name"])], dtype=np.int64)
        self.labels = label_indices(rows, classes)
        self._features: np.ndarray | None = None  # opened lazily, once per worker process

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._features is None:
            self._features = np.load(self.cache_path / FEATURES, mmap_mode="r")
        return torch.from_numpy(self._features[self.rows[i]].astype(np.float32)), int(self.labels[i])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_features"] = None
        return state


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainable.data.cache", description="Build the feature cache ahead of training.")
    parser.add_argument("--data-root", required=True, help="UrbanSound8K folder")
    parser.add_argument("--cache-dir", required=True, help="folder holding feature caches")
    parser.add_argument("--num-frames", type=int, default=1024, help="frames per clip (default: 1024)")
    parser.add_argument("--folds", type=int, nargs="+", default=None, help="folds to include (default: all)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def build_it() -> int:
        folds = tuple(sorted(args.folds or range(1, 11)))
        meta = load_metadata(args.data_root, args.folds)
        config = TrainConfig(data_root=args.data_root, num_frames=args.num_frames, feature_cache=args.cache_dir,
                             folds=folds, test_fold=folds[0])
        cache = FeatureCache.open(config, meta, args.workers)
        print(f"feature cache ready: {cache.path} ({len(cache.index)} clips)")
        return 0

    return run_cli(build_it, args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
