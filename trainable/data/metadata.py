"""UrbanSound8K's metadata: the CSV read and checked, fold splits, and the dataset check (``verify``).

Torch-free. Folds are the dataset's own: clips are never shuffled across folds. Clips of one freesound recording
(fsID) were meant to share a fold, but the official CSV has a few recordings in two folds: they are kept (results stay
comparable with published ones) and reported (``recordings_in_several_folds``).

    python -m trainable.data verify --data-root /path/UrbanSound8K
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ..errors import AstCvError

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


def _read_csv(root: Path) -> tuple[Path, pd.DataFrame]:
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
        return csv_path, pd.read_csv(csv_path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise AstCvError(f"Cannot parse {csv_path} as CSV ({exc}). Re-download the dataset's metadata file.") from exc


def _check_columns(meta: pd.DataFrame, csv_path: Path) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in meta.columns]
    if missing:
        raise AstCvError(
            f"{csv_path} lacks the column(s) {', '.join(missing)}; UrbanSound8K's CSV has "
            f"{', '.join(REQUIRED_COLUMNS)}. Use the original metadata file."
        )


def _whole_numbers(meta: pd.DataFrame, csv_path: Path) -> None:
    """fold and classID as ints (in place)."""
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
        raise AstCvError(f"{csv_path} lists fold(s) {bad_folds}; UrbanSound8K folds are 1..10. Fix the 'fold' column.")


def _check_classes(meta: pd.DataFrame, csv_path: Path) -> None:
    by_id = meta.groupby("classID")["class"].nunique()
    by_name = meta.groupby("class")["classID"].nunique()
    if (by_id > 1).any():
        cid = int(by_id[by_id > 1].index[0])
        detail = f"classID {cid} is labelled {sorted(meta.loc[meta['classID'] == cid, 'class'].unique())}"
    elif (by_name > 1).any():
        name = by_name[by_name > 1].index[0]
        detail = f"class '{name}' has classIDs {sorted(int(i) for i in meta.loc[meta['class'] == name, 'classID'].unique())}"
    else:
        return
    raise AstCvError(f"{csv_path}: classID and class disagree ({detail}). Each classID must name one class; fix the rows "
                     f"or re-download the metadata file.")


def _check_file_names(meta: pd.DataFrame, csv_path: Path) -> None:
    """File names plain (no path parts) and listed once (in place: names as str)."""
    names = meta["slice_file_name"].astype(str)
    unsafe = names[names.str.contains(r"[/\\]", regex=True) | names.isin(["", ".", ".."]) | names.str.contains(r"\.\.", regex=True)]
    if len(unsafe):
        raise AstCvError(
            f"{csv_path}: {_count(len(unsafe), 'file name')} {'is' if len(unsafe) == 1 else 'are'} not plain "
            f"(first: {unsafe.iloc[0]!r}). slice_file_name must be a bare file name without '/', '\\' or '..'; "
            f"clips are always read from audio/fold<N>/."
        )
    meta["slice_file_name"] = names
    counts = names.value_counts()
    repeated = counts[counts > 1]
    if len(repeated):
        first = repeated.index[0]
        rows = [int(i) + 2 for i in meta.index[names == first]]
        whole_rows = int(meta.duplicated().sum())
        raise AstCvError(
            f"{csv_path}: {_count(len(repeated), 'file name')} repeated (first: {first!r}, listed {repeated.iloc[0]} "
            f"times, CSV rows {rows}{f'; {whole_rows} row(s) are exact repeats' if whole_rows else ''}). Each clip must "
            f"be listed once, or it counts twice in the accuracy. Remove the repeated rows."
        )


def _select_folds(meta: pd.DataFrame, folds: Iterable[int] | None, csv_path: Path) -> pd.DataFrame:
    if folds is None:
        return meta.reset_index(drop=True)
    wanted = sorted({int(f) for f in folds})
    outside = [f for f in wanted if f not in ALL_FOLDS]
    if outside:
        raise AstCvError(f"--folds {outside} outside 1..10; UrbanSound8K folds are numbered 1 to 10.")
    absent = [f for f in wanted if f not in set(meta["fold"])]
    if absent:
        raise AstCvError(f"{csv_path} has no clips in fold(s) {absent}. Folds present: {sorted(set(meta['fold']))}.")
    return meta[meta["fold"].isin(wanted)].reset_index(drop=True)


def _check_files_exist(root: Path, meta: pd.DataFrame) -> None:
    exists = [audio_path(root, f, n).is_file() for f, n in zip(meta["fold"], meta["slice_file_name"])]
    lost = meta[~np.asarray(exists, dtype=bool)]
    if len(lost):
        first = ", ".join(f"fold{f}/{n}" for f, n in zip(lost["fold"][:3], lost["slice_file_name"][:3]))
        raise AstCvError(
            f"{_count(len(lost), 'file')} listed in the CSV {'is' if len(lost) == 1 else 'are'} missing under "
            f"{root / AUDIO_DIRNAME} (first: {first}; in fold(s) {sorted(set(lost['fold']))}). Pass --folds to use "
            f"only the folds you have, or restore the missing files."
        )


def load_metadata(root: str | Path, folds: Iterable[int] | None = None, check_files: bool = True) -> pd.DataFrame:
    """Read and check ``root/metadata/UrbanSound8K.csv``, keeping only ``folds`` (default: all ten).

    Raises AstCvError, saying what is wrong and how to fix it, for: a missing root or CSV, missing columns, folds
    outside 1..10, a classID mapped to two class names (or the reverse), file names that are not plain names or are
    listed twice, and listed files missing under ``root/audio/fold{N}/``.
    """
    root = Path(root).expanduser()
    csv_path, meta = _read_csv(root)
    _check_columns(meta, csv_path)
    _whole_numbers(meta, csv_path)
    _check_classes(meta, csv_path)
    _check_file_names(meta, csv_path)
    meta = _select_folds(meta, folds, csv_path)
    if check_files:
        _check_files_exist(root, meta)
    return meta


def recordings_in_several_folds(metadata: pd.DataFrame) -> dict[int, list[int]]:
    """fsIDs with clips in more than one fold: {fsID: sorted folds}. The official CSV has a few."""
    folds = metadata.groupby("fsID")["fold"].unique()
    return {int(fs): sorted(int(f) for f in fl) for fs, fl in folds.items() if len(fl) > 1}


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

    Pure function of the metadata. Splits are whole folds, so no clip is in two splits (a recording, fsID,
    can be: see ``recordings_in_several_folds``).
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



US8K_FOLD_SIZES = {1: 873, 2: 888, 3: 925, 4: 990, 5: 936, 6: 823, 7: 838, 8: 806, 9: 816, 10: 837}


def _by_fold(items: list[tuple[int, str]], among: set[tuple[int, str]], words: tuple[str, str]) -> list[str]:
    """Missing or extra files summarized by fold (folds where all of them are, folds where some are), then examples:
    a dataset missing whole folds reads as that, not as a list of one fold's file names."""
    count = {f: sum(1 for g, _ in items if g == f) for f in sorted({f for f, _ in items})}
    of = {f: sum(1 for g, _ in among if g == f) for f in count}
    whole = [f for f in count if count[f] == of[f]]
    part = [f for f in count if count[f] < of[f]]
    lines = []
    if whole:
        lines.append(f"  folds {words[0]}: {', '.join(map(str, whole))} ({sum(count[f] for f in whole):,} files)")
    if part:
        lines.append(f"  folds {words[1]}: " + ", ".join(f"fold {f} ({count[f]:,} of {of[f]:,})" for f in part))
    examples = [i for i in items if i[0] in part][:5] or items[:5]
    more = len(items) - len(examples)
    lines.append("  e.g. " + ", ".join(f"fold{f}/{n}" for f, n in examples) + (f" and {more:,} more" if more else ""))
    return lines


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
    for what, items, among, words in (
            ("missing (listed in the CSV, not on disk)", missing, listed, ("missing entirely", "missing in part")),
            ("extra (on disk, not in the CSV)", extra, on_disk, ("not in the CSV at all", "with extra files"))):
        if items:
            ok = False
            lines += [f"{len(items):,} files {what}:", *_by_fold(items, among, words)]
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

