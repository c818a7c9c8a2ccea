"""UrbanSound8K data layer: metadata validation, fold splits, audio decoding and an on-the-fly Dataset.

Folds are the dataset's own: clips are never shuffled across folds (clips of one freesound recording
share a fold, so mixing folds leaks near-duplicates into the test set).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import soundfile as sf
import torch
import torchaudio.functional as AF

from .errors import AstCvError
from .features import DEFAULT_NUM_FRAMES, SAMPLE_RATE, fbank, frames_for_seconds

log = logging.getLogger(__name__)

METADATA_RELPATH = Path("metadata") / "UrbanSound8K.csv"
AUDIO_DIRNAME = "audio"
REQUIRED_COLUMNS = ("slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class")
ALL_FOLDS = tuple(range(1, 11))
US8K_CLASSES = (
    "air_conditioner",
    "car_horn",
    "children_playing",
    "dog_bark",
    "drilling",
    "engine_idling",
    "gun_shot",
    "jackhammer",
    "siren",
    "street_music",
)


def audio_path(root: str | Path, fold: int, file_name: str) -> Path:
    """Where UrbanSound8K keeps a clip: ``root/audio/fold{fold}/{file_name}``."""
    return Path(root) / AUDIO_DIRNAME / f"fold{int(fold)}" / file_name


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}{'' if n == 1 else 's'}"


def load_metadata(root: str | Path, folds: Iterable[int] | None = None, check_files: bool = True) -> pd.DataFrame:
    """Read and validate ``root/metadata/UrbanSound8K.csv``, keeping only ``folds`` (default: all ten).

    Raises AstCvError, with what is wrong and how to fix it, for: a missing root or CSV, missing columns,
    folds outside 1..10, a classID mapped to two class names (or the reverse), file names that are not
    plain names, and listed files missing under ``root/audio/fold{N}/``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise AstCvError(
            f"Data root {root} does not exist or is not a folder. Pass --data-root pointing at the UrbanSound8K "
            f"folder (the one holding audio/ and metadata/), or use --demo for a generated dataset."
        )
    csv_path = root / METADATA_RELPATH
    if not csv_path.is_file():
        raise AstCvError(
            f"No metadata CSV at {csv_path}. An UrbanSound8K folder holds metadata/UrbanSound8K.csv and "
            f"audio/fold1..fold10; check that --data-root points at the folder that contains both."
        )
    try:
        meta = pd.read_csv(csv_path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise AstCvError(f"Cannot parse {csv_path} as CSV ({exc}). Re-download the dataset's metadata file.") from exc

    missing = [c for c in REQUIRED_COLUMNS if c not in meta.columns]
    if missing:
        raise AstCvError(
            f"{csv_path} lacks the column(s) {', '.join(missing)}; UrbanSound8K's CSV has "
            f"{', '.join(REQUIRED_COLUMNS)}. Use the original metadata file."
        )
    for col in ("fold", "classID"):
        numeric = pd.to_numeric(meta[col], errors="coerce")
        bad = meta[numeric.isna() | (numeric != numeric.round())]
        if len(bad):
            raise AstCvError(
                f"{csv_path}: column '{col}' must hold whole numbers; row {bad.index[0] + 2} has "
                f"{bad[col].iloc[0]!r}. Fix or re-download the metadata file."
            )
        meta[col] = numeric.astype(int)

    bad_folds = sorted(set(meta["fold"]) - set(ALL_FOLDS))
    if bad_folds:
        raise AstCvError(
            f"{csv_path} lists fold(s) {bad_folds}; UrbanSound8K folds are 1..10. Fix the 'fold' column."
        )

    by_id = meta.groupby("classID")["class"].nunique()
    by_name = meta.groupby("class")["classID"].nunique()
    if (by_id > 1).any() or (by_name > 1).any():
        if (by_id > 1).any():
            cid = int(by_id[by_id > 1].index[0])
            names = sorted(meta.loc[meta["classID"] == cid, "class"].unique())
            detail = f"classID {cid} is labelled {names}"
        else:
            name = by_name[by_name > 1].index[0]
            ids = sorted(int(i) for i in meta.loc[meta["class"] == name, "classID"].unique())
            detail = f"class '{name}' has classIDs {ids}"
        raise AstCvError(
            f"{csv_path}: classID and class disagree ({detail}). Each classID must name one class; "
            f"fix the rows or re-download the metadata file."
        )

    names = meta["slice_file_name"].astype(str)
    unsafe = names[names.str.contains(r"[/\\]", regex=True) | names.isin(["", ".", ".."]) | names.str.contains(r"\.\.", regex=True)]
    if len(unsafe):
        raise AstCvError(
            f"{csv_path}: {_count(len(unsafe), 'file name')} {'is' if len(unsafe) == 1 else 'are'} not plain "
            f"(first: {unsafe.iloc[0]!r}). slice_file_name must be a bare file name without '/', '\\' or '..'; "
            f"clips are always read from audio/fold<N>/."
        )
    meta["slice_file_name"] = names

    if folds is not None:
        wanted = sorted({int(f) for f in folds})
        outside = [f for f in wanted if f not in ALL_FOLDS]
        if outside:
            raise AstCvError(f"--folds {outside} outside 1..10; UrbanSound8K folds are numbered 1 to 10.")
        absent = [f for f in wanted if f not in set(meta["fold"])]
        if absent:
            raise AstCvError(
                f"{csv_path} has no clips in fold(s) {absent}. Folds present: {sorted(set(meta['fold']))}."
            )
        meta = meta[meta["fold"].isin(wanted)]
    meta = meta.reset_index(drop=True)

    if check_files:
        audio_root = root / AUDIO_DIRNAME
        exists = [audio_path(root, f, n).is_file() for f, n in zip(meta["fold"], meta["slice_file_name"])]
        lost = meta[~np.asarray(exists, dtype=bool)]
        if len(lost):
            first = ", ".join(f"fold{f}/{n}" for f, n in zip(lost["fold"][:3], lost["slice_file_name"][:3]))
            lost_folds = sorted(set(lost["fold"]))
            raise AstCvError(
                f"{_count(len(lost), 'file')} listed in the CSV {'is' if len(lost) == 1 else 'are'} missing under "
                f"{audio_root} (first: {first}; in fold(s) {lost_folds}). Pass --folds to use only the folds you "
                f"have, or restore the missing files."
            )
    return meta


def class_names(metadata: pd.DataFrame) -> list[str]:
    """Class names ordered by classID; position i is the model's label index i."""
    pairs = metadata[["classID", "class"]].drop_duplicates().sort_values("classID")
    return [str(c) for c in pairs["class"]]


def label_indices(metadata: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """The model label index of each row (position of its class name in ``classes``)."""
    lookup = {name: i for i, name in enumerate(classes)}
    return metadata["class"].map(lookup).to_numpy(dtype=np.int64)


def default_val_fold(test_fold: int, folds: Sequence[int]) -> int:
    """The fold before ``test_fold`` among ``folds``, cyclically (test 1 of 1..10 -> validate on 10)."""
    ordered = sorted(set(int(f) for f in folds))
    if test_fold not in ordered:
        raise AstCvError(f"Test fold {test_fold} is not among the folds in use {ordered}.")
    return ordered[ordered.index(test_fold) - 1]


@dataclass(frozen=True)
class Splits:
    """Train/validation/test rows of the metadata for one cross-validation round."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame


def split_folds(metadata: pd.DataFrame, test_fold: int, val_fold: int | None = None) -> Splits:
    """Split by whole folds: test = ``test_fold``, val = ``val_fold`` (default: the fold before), train = the rest.

    Pure function of the metadata. Because splits are whole folds, no clip and no fsID is in two splits.
    """
    folds = sorted(set(int(f) for f in metadata["fold"]))
    if len(folds) < 3:
        raise AstCvError(
            f"Cross-validation needs at least 3 folds (train, validation, test); got {folds}. Pass more --folds."
        )
    if val_fold is None:
        val_fold = default_val_fold(test_fold, folds)
    if test_fold not in folds or val_fold not in folds:
        raise AstCvError(f"Test fold {test_fold} and validation fold {val_fold} must be among the folds in use {folds}.")
    if val_fold == test_fold:
        raise AstCvError(f"The validation fold must differ from the test fold (both are {test_fold}).")
    fold = metadata["fold"].astype(int)
    return Splits(
        train=metadata[(fold != test_fold) & (fold != val_fold)].reset_index(drop=True),
        val=metadata[fold == val_fold].reset_index(drop=True),
        test=metadata[fold == test_fold].reset_index(drop=True),
    )


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Decode a sound file to a 1-D float32 tensor: channels averaged to mono, resampled to ``sample_rate``.

    Reads every WAV kind UrbanSound8K holds (8-bit unsigned, 16/24/32-bit PCM, 32/64-bit float,
    WAVE_FORMAT_EXTENSIBLE, IMA ADPCM; mono or stereo; 8-192 kHz) through libsndfile.
    Raises AstCvError naming the file if it is empty, unreadable, or holds NaN/inf samples.
    """
    path = Path(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AstCvError(f"Cannot decode audio file {path}: {exc}. Replace the file or remove its row from the CSV.") from exc
    if data.shape[0] == 0:
        raise AstCvError(f"Audio file {path} holds no samples. Replace the file or remove its row from the CSV.")
    if not np.isfinite(data).all():
        raise AstCvError(f"Audio file {path} holds NaN or infinite samples. Replace the file or remove its row from the CSV.")
    wave = torch.from_numpy(data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0].copy())
    if rate != sample_rate:
        g = math.gcd(int(rate), int(sample_rate))
        wave = AF.resample(wave, int(rate) // g, int(sample_rate) // g)
    return wave.contiguous()


def longest_clip_seconds(root: str | Path, metadata: pd.DataFrame) -> float:
    """Duration of the longest clip listed in ``metadata``, read from the file headers."""
    longest = 0.0
    for fold, name in zip(metadata["fold"], metadata["slice_file_name"]):
        path = audio_path(root, fold, name)
        try:
            info = sf.info(str(path))
        except (sf.LibsndfileError, RuntimeError, OSError) as exc:
            raise AstCvError(f"Cannot read the header of {path}: {exc}. Replace the file or remove its row from the CSV.") from exc
        longest = max(longest, info.frames / info.samplerate)
    return longest


AUTO_FRAMES_SLACK = 8  # frames (80 ms) of the longest clip that may be cut: IMA ADPCM pads its last block


def auto_num_frames(root: str | Path, metadata: pd.DataFrame, multiple: int = 16) -> int:
    """The smallest frame count (a multiple of AST's 16-frame patch) holding the longest clip: 400 for 4 s clips.

    Up to ``AUTO_FRAMES_SLACK`` trailing frames may be cut, so block padding (a 4 s IMA ADPCM file decodes to
    4.03 s) does not cost a whole extra patch column on every clip.
    """
    frames = frames_for_seconds(longest_clip_seconds(root, metadata)) - AUTO_FRAMES_SLACK
    return max(multiple, -(-frames // multiple) * multiple)


def clip_id(fold: int, name: str) -> str:
    """How a clip is named in messages and in ``skip_clips``: ``fold3/123-4-0-0.wav``."""
    return f"fold{int(fold)}/{name}"


def drop_clips(metadata: pd.DataFrame, clips: Iterable[str]) -> pd.DataFrame:
    """``metadata`` without the rows of ``clips`` (clip ids as made by ``clip_id``)."""
    clips = set(clips)
    if not clips:
        return metadata
    keep = [clip_id(f, n) not in clips for f, n in zip(metadata["fold"], metadata["slice_file_name"])]
    return metadata[np.asarray(keep, dtype=bool)].reset_index(drop=True)


def screen_headers(root: str | Path, metadata: pd.DataFrame) -> dict[str, str]:
    """Clips whose file header cannot be read or that hold no samples: {clip id: reason}. Fast (no decoding)."""
    bad = {}
    for fold, name in zip(metadata["fold"], metadata["slice_file_name"]):
        path = audio_path(root, fold, name)
        try:
            info = sf.info(str(path))
            if info.frames == 0:
                bad[clip_id(fold, name)] = "no samples"
        except (sf.LibsndfileError, RuntimeError, OSError) as exc:
            bad[clip_id(fold, name)] = f"unreadable: {str(exc).splitlines()[0]}"
    return bad


def clip_features(path: str | Path, num_frames: int = DEFAULT_NUM_FRAMES) -> torch.Tensor:
    """Decode one clip and return its normalized AST features, [num_frames, 128]."""
    return fbank(load_audio(path), num_frames=num_frames)


class ClipDataset(torch.utils.data.Dataset):
    """Yields (features [num_frames, 128] float32, label index) for metadata rows, decoding on the fly."""

    def __init__(self, root: str | Path, rows: pd.DataFrame, classes: Sequence[str], num_frames: int = DEFAULT_NUM_FRAMES):
        self.paths = [audio_path(root, f, n) for f, n in zip(rows["fold"], rows["slice_file_name"])]
        self.labels = label_indices(rows, classes)
        self.num_frames = num_frames

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return clip_features(self.paths[i], self.num_frames), int(self.labels[i])


US8K_FOLD_SIZES = {1: 873, 2: 888, 3: 925, 4: 990, 5: 936, 6: 823, 7: 838, 8: 806, 9: 816, 10: 837}


def verify_dataset(root: str | Path) -> tuple[bool, list[str]]:
    """Compare a folder with the real UrbanSound8K's shape. Returns (matches, report lines)."""
    root = Path(root).expanduser()
    lines: list[str] = []
    meta = load_metadata(root, check_files=False)
    ok = True
    total = len(meta)
    expected_total = sum(US8K_FOLD_SIZES.values())
    lines.append(f"clips in the CSV: {total:,} (UrbanSound8K: {expected_total:,})")
    ok &= total == expected_total
    for fold, want in US8K_FOLD_SIZES.items():
        have = int((meta["fold"] == fold).sum())
        if have != want:
            ok = False
            lines.append(f"fold {fold}: {have} clips in the CSV, UrbanSound8K has {want}")
    names = class_names(meta)
    if tuple(names) != US8K_CLASSES:
        ok = False
        lines.append(f"classes: {names}; UrbanSound8K's are {list(US8K_CLASSES)}")
    listed = {(int(f), n) for f, n in zip(meta["fold"], meta["slice_file_name"])}
    on_disk = {(int(p.parent.name[4:]), p.name) for p in (root / AUDIO_DIRNAME).glob("fold*/*")
               if p.is_file() and p.parent.name[4:].isdigit() and not p.name.startswith(".")}
    missing, extra = sorted(listed - on_disk), sorted(on_disk - listed)
    for what, items in (("missing (listed in the CSV, not on disk)", missing), ("extra (on disk, not in the CSV)", extra)):
        if items:
            ok = False
            sample = ", ".join(f"fold{f}/{n}" for f, n in items[:5])
            lines.append(f"{len(items):,} files {what}: {sample}{' ...' if len(items) > 5 else ''}")
    lines.append("matches UrbanSound8K's shape" if ok else "does NOT match UrbanSound8K's shape (see above)")
    return ok, lines


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trainable.data", description="Dataset tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="compare a folder with the real UrbanSound8K (8,732 clips, 10 folds, 10 classes)")
    v.add_argument("--data-root", required=True, help="the UrbanSound8K folder (holding audio/ and metadata/)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    args = build_parser().parse_args(argv)
    try:
        ok, lines = verify_dataset(args.data_root)
    except AstCvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
