#!/usr/bin/env python
"""Input pipeline throughput: clips/s decoding on the fly (decode + resample + fbank) vs reading the feature cache.

    python benchmarks/input.py                          # on a generated set (written to a temp folder)
    python benchmarks/input.py --data-root /data/UrbanSound8K --limit 500
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainable.data.audio import ClipDataset  # noqa: E402
from trainable.data.cache import CachedDataset, FeatureCache  # noqa: E402
from trainable.config import TrainConfig  # noqa: E402
from trainable.data.metadata import class_names, load_metadata  # noqa: E402
from trainable.data.synth import generate  # noqa: E402


def rate(dataset, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        dataset[i]
    return n / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None, help="an UrbanSound8K folder (default: generate one, 3 clips/class/fold)")
    p.add_argument("--num-frames", type=int, default=400, help="frames per clip (default: 400)")
    p.add_argument("--limit", type=int, default=None, help="clips to time (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, as in one DataLoader worker (default: 1)")
    p.add_argument("--json", default=None, help="write the result to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_root) if args.data_root else Path(tmp) / "data"
        if not args.data_root:
            generate(root, clips_per_class=3, seed=0)
        meta = load_metadata(root)
        classes = class_names(meta)
        n = min(args.limit or len(meta), len(meta))
        t0 = time.perf_counter()
        folds = tuple(sorted(set(int(f) for f in meta["fold"])))
        config = TrainConfig(data_root=str(root), folds=folds, test_fold=folds[0], num_frames=args.num_frames,
                             feature_cache=str(Path(tmp) / "cache"))
        cache = FeatureCache.open(config, meta)
        build_s = time.perf_counter() - t0
        on_the_fly = rate(ClipDataset(root, meta, classes, args.num_frames), n)
        cached = rate(CachedDataset(cache, meta, classes), n)
        cached = max(cached, rate(CachedDataset(cache, meta, classes), n))  # second pass: page cache warm
    result = {"data": str(args.data_root or "generated"), "clips": n, "num_frames": args.num_frames,
              "on_the_fly_clips_per_s": on_the_fly, "cached_clips_per_s": cached, "ratio": cached / on_the_fly,
              "cache_build_s": build_s, "ms_per_clip_on_the_fly": 1000 / on_the_fly}
    print(f"{n} clips, {args.num_frames} frames: on the fly {on_the_fly:.1f} clips/s ({1000 / on_the_fly:.2f} ms/clip), "
          f"cached {cached:.0f} clips/s, ratio {cached / on_the_fly:.0f}x; cache built in {build_s:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
