import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from trainable.data.cache import CachedDataset, FeatureCache
from trainable.config import TrainConfig
from trainable.data.audio import ClipDataset, auto_num_frames
from trainable.data.metadata import class_names, load_metadata
from trainable.data.synth import WAV_KINDS, class_signal, write_clip
from trainable.store.experiment import EPOCH
from trainable.fit.train import fit

ROOT = Path(__file__).resolve().parent.parent


def _cache(root, cache_dir, frames, workers=None):
    """FeatureCache.open for all folds of ``root`` at ``frames`` frames."""
    meta = load_metadata(root)
    folds = tuple(sorted(set(int(f) for f in meta["fold"])))
    config = TrainConfig(data_root=str(root), folds=folds, test_fold=folds[0], num_frames=frames, feature_cache=str(cache_dir))
    return FeatureCache.open(config, meta, workers)


def test_cache_gives_the_on_the_fly_tensors(synth_root, tmp_path):
    meta = load_metadata(synth_root)
    classes = class_names(meta)
    cache = _cache(synth_root, tmp_path, 400)
    rows = meta.sample(frac=1, random_state=0)  # any order of rows maps to the right cache entries
    cached, direct = CachedDataset(cache, rows, classes), ClipDataset(synth_root, rows, classes, 400)
    for i in range(len(rows)):
        (a, ya), (b, yb) = cached[i], direct[i]
        assert ya == yb and a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (400, 128)
        assert (a - b).abs().max().item() <= 1e-3  # float16 storage of values within [-2, 2]


def test_same_settings_reuse_and_changes_rebuild(synth_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    first = _cache(data, tmp_path / "c", 400)
    stamp = (first.path / "features.npy").stat().st_mtime_ns
    again = _cache(data, tmp_path / "c", 400)
    assert again.path == first.path and (again.path / "features.npy").stat().st_mtime_ns == stamp
    other_frames = _cache(data, tmp_path / "c", 512)
    assert other_frames.path != first.path and other_frames.array().shape[1] == 512
    meta = load_metadata(data)
    fold, name = int(meta["fold"][5]), meta["slice_file_name"][5]
    write_clip(data / "audio" / f"fold{fold}" / name, class_signal(3, 1.0, 16000, np.random.default_rng(9)), WAV_KINDS[6])
    changed = _cache(data, tmp_path / "c", 400)
    assert changed.path != first.path
    i = changed.index[(fold, name)]
    assert not np.array_equal(changed.array()[i], first.array()[first.index[(fold, name)]])


def test_copies_of_the_dataset_on_other_nodes_share_the_cache_key(synth_root, tmp_path):
    from trainable.data.cache import cache_key

    meta = load_metadata(synth_root)
    copy = tmp_path / "node2" / "data"
    shutil.copytree(synth_root, copy)
    for wav in copy.rglob("*.wav"):
        os.utime(wav, (1e9, 1e9))  # copied at another time: only the modification times differ
    assert cache_key(copy, meta, 400) == cache_key(synth_root, meta, 400)
    fold, name = int(meta["fold"][0]), meta["slice_file_name"][0]
    with open(copy / "audio" / f"fold{fold}" / name, "ab") as fh:
        fh.write(b"\0" * 2)  # a file of another size is another dataset
    assert cache_key(copy, meta, 400) != cache_key(synth_root, meta, 400)


def test_trials_starting_together_build_once(synth_root, tmp_path):
    script = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout);"
              "from test_cache import _cache;"
              f"_cache({str(synth_root)!r}, {str(tmp_path / 'c')!r}, 256, workers=1)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum("building the feature cache" in o for o in outputs) == 1
    assert len([p for p in (tmp_path / "c").iterdir() if p.is_dir()]) == 1


def test_machines_sharing_the_cache_folder_never_write_into_one_anothers_build(synth_root, tmp_path, monkeypatch):
    """A cluster's nodes on one NFS folder, where the file lock may not reach across machines: each builds into a
    folder of its own; one that finishes after the cache is there keeps that one (trials may have it open)."""
    from trainable.data import cache as cache_module

    meta = load_metadata(synth_root)
    monkeypatch.setattr(cache_module.socket, "gethostname", lambda: "node-a")
    path = _cache(synth_root, tmp_path / "c", 256, workers=1).path
    shutil.rmtree(path)
    a_building = path.with_name(path.name + ".building-node-a")
    a_building.mkdir()
    (a_building / "features.npy").write_bytes(b"node A is writing this")  # node A's build, under way
    monkeypatch.setattr(cache_module.socket, "gethostname", lambda: "node-b")
    built = _cache(synth_root, tmp_path / "c", 256, workers=1)  # node B builds at the same time, and is done first
    assert (a_building / "features.npy").read_bytes() == b"node A is writing this"
    first = (path.stat().st_ino, built.array().copy())
    monkeypatch.setattr(cache_module.socket, "gethostname", lambda: "node-a")
    cache_module.build(path, synth_root, meta, 256, workers=1)  # node A finishes: B's cache stays, A's is dropped
    assert path.stat().st_ino == first[0] and np.array_equal(_cache(synth_root, tmp_path / "c", 256).array(), first[1])
    assert [p.name for p in (tmp_path / "c").iterdir() if p.is_dir()] == [path.name]


def test_auto_frames_fit_the_longest_clip(synth_root, tmp_path):
    meta = load_metadata(synth_root)
    assert auto_num_frames(synth_root, meta) == 400  # generated clips last up to 4 s, like UrbanSound8K's
    # A 4 s IMA ADPCM file decodes to ~4.03 s (block padding): still 400 frames; 4.2 s of real audio needs 416.
    data = tmp_path / "d"
    shutil.copytree(synth_root, data)
    fold, name = int(meta["fold"][0]), meta["slice_file_name"][0]
    write_clip(data / "audio" / f"fold{fold}" / name, class_signal(0, 4.0, 11025, np.random.default_rng(0)), WAV_KINDS[7])
    assert WAV_KINDS[7].subtype == "IMA_ADPCM" and sf.info(str(data / "audio" / f"fold{fold}" / name)).duration > 4.0
    assert auto_num_frames(data, meta) == 400
    write_clip(data / "audio" / f"fold{fold}" / name, class_signal(0, 4.2, 16000, np.random.default_rng(0)), WAV_KINDS[6])
    assert auto_num_frames(data, meta) == 416
    short = meta[meta["end"] - meta["start"] < 1.0]
    assert auto_num_frames(synth_root, short) < 112


def test_a_1024_frame_checkpoint_trains_at_400(synth_root, tiny_ast_1024, tmp_path):
    config = TrainConfig.from_dict(dict(data_root=str(synth_root), model=str(tiny_ast_1024), folds=(1, 2, 3, 4),
                                        test_fold=1, epochs=1, num_frames=400, num_workers=0, lr=1e-3))
    rows = []
    fit(config, lambda m, ckpt: rows.append((m, json.loads((ckpt / "best" / "config.json").read_text()))))
    metrics, saved = rows[0]
    assert np.isfinite(metrics["train_loss"]) and saved["max_length"] == 400


def test_cpu_trial_results_unchanged_with_the_cache(synth_root, tiny_ast_1024, tmp_path):
    base = dict(data_root=str(synth_root), model=str(tiny_ast_1024), folds=(1, 2, 3, 4), test_fold=3, epochs=2,
                num_frames=400, num_workers=0, lr=1e-3)
    results = {}
    for name, cache in (("direct", ""), ("cached", str(tmp_path / "cache"))):
        rows = []
        fit(TrainConfig.from_dict({**base, "feature_cache": cache}), lambda m, ckpt: rows.append(m))
        results[name] = rows
    for a, b in zip(results["direct"], results["cached"]):
        assert a[EPOCH] == b[EPOCH]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-2)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-2)
        assert abs(a["val_accuracy"] - b["val_accuracy"]) <= 0.05
        assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 0.05
