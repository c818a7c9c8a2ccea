import shutil

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from trainable.data.audio import ClipDataset, load_audio
from trainable.data.metadata import ALL_FOLDS, class_names, default_val_fold, load_metadata, split_folds
from trainable.errors import AstCvError
from trainable.data.synth import WAV_KINDS, WavKind, class_signal, generate, write_clip

# (kind, max abs error vs. the float reference after resampling): quantization bounds per encoding.
KIND_TOLERANCE = {
    "PCM_U8": 2.0 / 128,
    "PCM_16": 1e-4,
    "PCM_24": 1e-5,
    "PCM_32": 1e-5,
    "FLOAT": 1e-5,
    "DOUBLE": 1e-5,
}
ADPCM_RMS = 0.03  # IMA ADPCM is lossy and adapts its step at each block start: bound the RMS error instead
EXTRA_KINDS = (WavKind("WAV", "PCM_16", 1, 8000), WavKind("WAV", "PCM_16", 2, 192000), WavKind("WAVEX", "PCM_24", 2, 96000))


@pytest.mark.parametrize("kind", WAV_KINDS + EXTRA_KINDS, ids=lambda k: k.label)
def test_every_wav_kind_decodes_to_the_float_reference(tmp_path, kind):
    rng = np.random.default_rng(0)
    mono = class_signal(8, 0.5, kind.sample_rate, rng)  # a siren sweep: smooth, well inside [-1, 1]
    path = tmp_path / "clip.wav"
    write_clip(path, mono, kind)
    info = sf.info(str(path))
    assert info.samplerate == kind.sample_rate and info.channels == kind.channels
    assert info.subtype == kind.subtype and info.format == kind.format

    got = load_audio(path)
    reference = torch.from_numpy(mono.astype(np.float32))
    if kind.channels == 2:
        reference = reference * (1 + 0.9) / 2  # write_clip's second channel is 0.9 x the first
    if kind.sample_rate != 16000:
        reference = AF.resample(reference, kind.sample_rate, 16000)
    assert got.dtype == torch.float32 and got.dim() == 1
    # IMA ADPCM stores whole blocks, so its last block may carry up to one block of padding samples.
    extra = 1024 if kind.subtype == "IMA_ADPCM" else 1
    assert 0 <= got.numel() - reference.numel() + 1 <= extra + 1
    n = min(got.numel(), reference.numel())
    diff = got[:n] - reference[:n]
    if kind.subtype == "IMA_ADPCM":
        rms = diff.pow(2).mean().sqrt().item()
        assert rms <= ADPCM_RMS, f"{kind.label}: RMS error {rms}"
    else:
        err = diff.abs().max().item()
        assert err <= KIND_TOLERANCE[kind.subtype], f"{kind.label}: max error {err}"


def test_empty_and_corrupt_files_raise_naming_the_file(tmp_path):
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0), 16000, subtype="PCM_16")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2000))
    zero_bytes = tmp_path / "zero.wav"
    zero_bytes.write_bytes(b"")
    nan = tmp_path / "nan.wav"
    sf.write(str(nan), np.array([0.0, np.nan, 0.1] * 100, dtype=np.float32), 16000, subtype="FLOAT")
    for path in (empty, corrupt, zero_bytes, nan):
        with pytest.raises(AstCvError, match=path.name):
            load_audio(path)


def test_generated_dataset_has_the_real_layout_and_variety(synth_root):
    meta = pd.read_csv(synth_root / "metadata" / "UrbanSound8K.csv")
    assert list(meta.columns) == ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"]
    assert sorted(meta["fold"].unique()) == [1, 2, 3, 4]
    assert class_names(meta) == [
        "air_conditioner", "car_horn", "children_playing", "dog_bark", "drilling",
        "engine_idling", "gun_shot", "jackhammer", "siren", "street_music",
    ]
    for fold in (1, 2, 3, 4):
        rows = meta[meta["fold"] == fold]
        infos = [sf.info(str(synth_root / "audio" / f"fold{fold}" / n)) for n in rows["slice_file_name"]]
        assert len({(i.format, i.subtype, i.channels, i.samplerate) for i in infos}) >= 8
        durations = [i.duration for i in infos]
        assert min(durations) == pytest.approx(0.1, abs=0.01) and max(durations) == pytest.approx(4.0, abs=0.01)


def _decoded(path):
    info = sf.info(str(path))
    return (info.format, info.subtype, info.channels, info.samplerate), sf.read(str(path), dtype="float64")[0]


def test_generation_is_deterministic(tmp_path):
    # Compared decoded, not byte for byte: libsndfile stamps float WAVs' PEAK chunk with the time of writing.
    a = generate(tmp_path / "a", clips_per_class=1, folds=(2,), seed=7)
    b = generate(tmp_path / "b", clips_per_class=1, folds=(2,), seed=7)
    pd.testing.assert_frame_equal(a, b)
    for name in a["slice_file_name"]:
        (kind_a, xa), (kind_b, xb) = _decoded(tmp_path / "a/audio/fold2" / name), _decoded(tmp_path / "b/audio/fold2" / name)
        assert kind_a == kind_b and np.array_equal(xa, xb)
    c = generate(tmp_path / "c", clips_per_class=1, folds=(2,), seed=8)
    xa = _decoded(tmp_path / "a/audio/fold2" / a["slice_file_name"][3])[1]
    xc = _decoded(tmp_path / "c/audio/fold2" / c["slice_file_name"][3])[1]
    assert xa.shape != xc.shape or not np.array_equal(xa, xc)


def test_dataset_yields_features_and_labels(synth_root):
    meta = load_metadata(synth_root)
    ds = ClipDataset(synth_root, meta, class_names(meta), num_frames=400)
    x, y = ds[3]
    assert x.shape == (400, 128) and x.dtype == torch.float32
    assert y == meta["classID"][3]
    assert len(ds) == len(meta)


# ---- metadata validation: each problem gets its own clear error ----


@pytest.fixture
def us8k_copy(synth_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synth_root, root)
    return root


def _edit_csv(root, edit):
    path = root / "metadata" / "UrbanSound8K.csv"
    meta = pd.read_csv(path)
    meta = edit(meta)
    meta.to_csv(path, index=False)


def test_valid_metadata_loads_and_filters_folds(synth_root):
    meta = load_metadata(synth_root, folds=[2, 4])
    assert sorted(meta["fold"].unique()) == [2, 4]
    assert len(meta) == 40


def test_missing_root(tmp_path):
    with pytest.raises(AstCvError, match="does not exist.*--data-root"):
        load_metadata(tmp_path / "nope")


def test_missing_csv(tmp_path):
    with pytest.raises(AstCvError, match="No metadata CSV"):
        load_metadata(tmp_path)


def test_missing_column(us8k_copy):
    _edit_csv(us8k_copy, lambda m: m.drop(columns=["classID"]))
    with pytest.raises(AstCvError, match="lacks the column.*classID"):
        load_metadata(us8k_copy)


def test_fold_outside_range_in_csv(us8k_copy):
    _edit_csv(us8k_copy, lambda m: m.assign(fold=m["fold"].where(m.index != 5, 11)))
    with pytest.raises(AstCvError, match=r"fold\(s\) \[11\].*1\.\.10"):
        load_metadata(us8k_copy)


def test_requested_fold_outside_range(synth_root):
    with pytest.raises(AstCvError, match="outside 1..10"):
        load_metadata(synth_root, folds=[0, 1, 2])


def test_requested_fold_not_present(synth_root):
    with pytest.raises(AstCvError, match=r"no clips in fold\(s\) \[7\]"):
        load_metadata(synth_root, folds=[1, 2, 7])


def test_class_id_mismatch(us8k_copy):
    _edit_csv(us8k_copy, lambda m: m.assign(**{"class": m["class"].where(m.index != 0, "siren")}))
    with pytest.raises(AstCvError, match="classID and class disagree"):
        load_metadata(us8k_copy)


@pytest.mark.parametrize("bad_name", ["../escape.wav", "sub/dir.wav", "..", "a\\b.wav"])
def test_unsafe_file_names(us8k_copy, bad_name):
    _edit_csv(us8k_copy, lambda m: m.assign(slice_file_name=m["slice_file_name"].where(m.index != 2, bad_name)))
    with pytest.raises(AstCvError, match="not plain"):
        load_metadata(us8k_copy)


def test_missing_files_are_counted_with_examples(us8k_copy):
    shutil.rmtree(us8k_copy / "audio" / "fold3")
    with pytest.raises(AstCvError, match=r"20 files listed in the CSV are missing .*first: fold3/.*Pass --folds") as err:
        load_metadata(us8k_copy)
    assert "fold(s) [3]" in str(err.value)
    assert len(load_metadata(us8k_copy, folds=[1, 2, 4])) == 60


# ---- splits ----


@pytest.mark.parametrize("test_fold", ALL_FOLDS)
def test_splits_never_overlap_and_cover_everything(test_fold):
    rng = np.random.default_rng(test_fold)
    rows = [(f"{fold}-{i}.wav", fold * 100 + i // 3, fold, i % 10) for fold in ALL_FOLDS for i in range(12)]
    meta = pd.DataFrame(rows, columns=["slice_file_name", "fsID", "fold", "classID"]).sample(frac=1, random_state=int(rng.integers(100)))
    s = split_folds(meta, test_fold)
    assert set(s.test["fold"]) == {test_fold}
    assert set(s.val["fold"]) == {default_val_fold(test_fold, ALL_FOLDS)}
    names = [set(p["slice_file_name"]) for p in (s.train, s.val, s.test)]
    ids = [set(p["fsID"]) for p in (s.train, s.val, s.test)]
    for group in (names, ids):
        assert not (group[0] & group[1]) and not (group[0] & group[2]) and not (group[1] & group[2])
    assert sum(len(p) for p in (s.train, s.val, s.test)) == len(meta)
    assert len(set(s.train["fold"])) == 8


def test_default_validation_fold_is_the_previous_one_cyclically():
    assert default_val_fold(1, ALL_FOLDS) == 10
    assert default_val_fold(5, ALL_FOLDS) == 4
    assert default_val_fold(2, [2, 5, 9]) == 9
    assert default_val_fold(9, [2, 5, 9]) == 5


def test_split_errors(synth_root):
    meta = load_metadata(synth_root)
    with pytest.raises(AstCvError, match="must differ"):
        split_folds(meta, 2, 2)
    with pytest.raises(AstCvError, match="among the folds in use"):
        split_folds(meta, 7)
    with pytest.raises(AstCvError, match="at least 3 folds"):
        split_folds(meta[meta["fold"] <= 2], 1)
    s = split_folds(meta, 2, val_fold=4)
    assert set(s.val["fold"]) == {4} and set(s.train["fold"]) == {1, 3}
