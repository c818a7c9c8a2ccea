"""Audio in: decoding every WAV kind UrbanSound8K holds, file headers (durations, unreadable files), the frame count
that holds the clips, and the on-the-fly Dataset.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import soundfile as sf
import torch
import torchaudio.functional as AF

from .metadata import audio_path, clip_id, label_indices
from ..errors import AstCvError
from .features import DEFAULT_NUM_FRAMES, SAMPLE_RATE, fbank, frames_for_seconds

log = logging.getLogger(__name__)

PRETRAINED_FRAMES = DEFAULT_NUM_FRAMES  # the checkpoint's max_length: longer inputs interpolate its positions
AUTO_QUANTILE = 0.95  # --num-frames auto holds every clip up to OUTLIER_FACTOR x this quantile of the lengths;
OUTLIER_FACTOR = 1.5  # longer clips are outliers (one 70 s clip among 4 s ones), cut to the window and listed
AUTO_FRAMES_SLACK = 8  # frames (80 ms) a clip may lose to the cut anyway: IMA ADPCM pads its last block


class AudioError(AstCvError):
    """A sound file that cannot be used; the message names the file and why (callers add what to do)."""


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Decode a sound file to a 1-D float32 tensor: channels averaged to mono, resampled to ``sample_rate``.

    Reads every WAV kind UrbanSound8K holds (8-bit unsigned, 16/24/32-bit PCM, 32/64-bit float,
    WAVE_FORMAT_EXTENSIBLE, IMA ADPCM; mono or stereo; 8-192 kHz) through libsndfile.
    Raises AudioError naming the file if it is empty, unreadable, or holds NaN/inf samples.
    """
    path = Path(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioError(f"Cannot decode audio file {path}: {str(exc).rstrip('.')}.") from exc
    if data.shape[0] == 0:
        raise AudioError(f"Audio file {path} holds no samples.")
    if not np.isfinite(data).all():
        raise AudioError(f"Audio file {path} holds NaN or infinite samples.")
    wave = torch.from_numpy(data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0].copy())
    if rate != sample_rate:
        g = math.gcd(int(rate), int(sample_rate))
        wave = AF.resample(wave, int(rate) // g, int(sample_rate) // g)
    return wave.contiguous()


@dataclass(frozen=True)
class Headers:
    """What the file headers say, read once: each clip's duration, and the clips that cannot be used."""

    seconds: dict[str, float]  # clip id -> duration
    bad: dict[str, str]  # clip id -> why it cannot be used


def read_headers(root: str | Path, metadata: pd.DataFrame) -> Headers:
    """Read every listed clip's header (fast, no decoding)."""
    seconds, bad = {}, {}
    for fold, name in zip(metadata["fold"], metadata["slice_file_name"]):
        key = clip_id(fold, name)
        try:
            info = sf.info(str(audio_path(root, fold, name)))
        except (sf.LibsndfileError, RuntimeError, OSError) as exc:
            bad[key] = f"unreadable: {str(exc).splitlines()[0]}"
            continue
        if info.frames == 0:
            bad[key] = "no samples"
        else:
            seconds[key] = info.frames / info.samplerate
    return Headers(seconds, bad)


@dataclass(frozen=True)
class FrameChoice:
    frames: int
    cut: dict[str, float]  # clips longer than the window: clip id -> seconds


def choose_num_frames(seconds: dict[str, float], multiple: int = 16) -> FrameChoice:
    """The smallest frame count (a multiple of AST's 16-frame patch) holding every clip but the outliers.

    Outliers, clips longer than ``OUTLIER_FACTOR`` x the ``AUTO_QUANTILE`` quantile of the lengths, do not set the
    length for all (one 70 s clip would make every clip 7,000 frames, mostly padding); they are cut and listed. Up to ``AUTO_FRAMES_SLACK`` trailing frames of a clip may be cut without listing it, so block padding
    (a 4 s IMA ADPCM file decodes to 4.03 s) does not cost an extra patch column: 400 frames for UrbanSound8K.
    """
    if not seconds:
        raise AstCvError("No readable clips to size --num-frames auto from.")
    durations = np.asarray(list(seconds.values()))
    limit = OUTLIER_FACTOR * float(np.quantile(durations, AUTO_QUANTILE))
    held = float(durations[durations <= limit].max())
    frames = max(multiple, -(-(frames_for_seconds(held) - AUTO_FRAMES_SLACK) // multiple) * multiple)
    cut = {c: s for c, s in seconds.items() if frames_for_seconds(s) - AUTO_FRAMES_SLACK > frames}
    return FrameChoice(frames, dict(sorted(cut.items(), key=lambda kv: -kv[1])))


def describe_cut(cut: dict[str, float], frames: int, show: int = 5) -> str:
    listed = ", ".join(f"{c} ({s:.1f} s)" for c, s in list(cut.items())[:show])
    more = f" and {len(cut) - show} more" if len(cut) > show else ""
    return (f"{len(cut)} clip(s) longer than {frames} frames ({frames / 100:.2f} s) will be cut to it: {listed}{more}")


def auto_num_frames(root: str | Path, metadata: pd.DataFrame) -> int:
    """``choose_num_frames`` over the clips' headers; logs the clips that will be cut."""
    choice = choose_num_frames(read_headers(root, metadata).seconds)
    if choice.cut:
        log.warning("--num-frames auto: %s", describe_cut(choice.cut, choice.frames))
    return choice.frames


def long_input_warning(num_frames: int) -> str | None:
    """Why a frame count above the pretrained 1024 is costly, or None."""
    if num_frames <= PRETRAINED_FRAMES:
        return None
    return (f"--num-frames {num_frames} is above the {PRETRAINED_FRAMES} frames AST was pretrained with: its position "
            f"embeddings are stretched to fit, and compute grows faster than the length ({num_frames / PRETRAINED_FRAMES:.1f}x "
            f"the frames). UrbanSound8K's clips fit in 400 (--num-frames auto).")


class LineProgress:
    """Progress as whole lines, for a pipe or a notebook cell (where a redrawn bar becomes a new line at every redraw):
    a line at each further 10 % or after ``every_s`` seconds, whichever comes first, and one at the end."""

    def __init__(self, total: int, desc: str, stream=None, every_s: float = 30.0):
        self.total, self.desc, self.every_s = total, desc, every_s
        self.stream = stream or sys.stderr
        self.done, self.start = 0, time.monotonic()
        self.last_t, self.last_tenth = self.start, 0

    def _line(self, elapsed: float) -> None:
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = f", about {(self.total - self.done) / rate:.0f} s left" if rate and self.done < self.total else ""
        print(f"{self.desc}: {self.done}/{self.total} clips ({100 * self.done / max(self.total, 1):.0f} %, "
              f"{elapsed:.0f} s{left})", file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        now, tenth = time.monotonic(), 10 * self.done // max(self.total, 1)
        if self.done < self.total and (tenth > self.last_tenth or now - self.last_t >= self.every_s):
            self._line(now - self.start)
            self.last_t, self.last_tenth = now, tenth

    def close(self) -> None:
        self._line(time.monotonic() - self.start)


def progress_bar(total: int, desc: str):
    """tqdm's bar on a terminal; LineProgress where stderr is a pipe or a notebook."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="clip", mininterval=2.0)
    return LineProgress(total, desc)


def parallel_map(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int | None, desc: str) -> Iterator[Any]:
    """``fn`` over ``jobs`` in ``workers`` processes (default: every core), results in order, with a progress bar."""
    from concurrent.futures import ProcessPoolExecutor

    workers = max(1, workers or os.cpu_count() or 1)
    bar = progress_bar(len(jobs), desc)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for result in (pool.map(fn, jobs, chunksize=16) if pool else map(fn, jobs)):
            bar.update()
            yield result
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)


def _decode_problem(path: str) -> str:
    """Why a clip cannot be used ('' when it decodes to finite samples)."""
    torch.set_num_threads(1)
    try:
        load_audio(path)
    except AudioError as exc:
        return str(exc).rstrip(".")
    return ""


def find_unusable(root: str | Path, metadata: pd.DataFrame, headers: Headers | None = None,
                  workers: int | None = None) -> dict[str, str]:
    """Clip id -> why it cannot be used, for every listed clip: the headers first (empty, unreadable), then every
    other clip decoded in parallel (corrupt data, NaN/inf samples), as ``--no-cache`` trials would meet them."""
    bad = dict((headers or read_headers(root, metadata)).bad)
    rest = [(clip_id(f, n), str(audio_path(root, f, n))) for f, n in zip(metadata["fold"], metadata["slice_file_name"])
            if clip_id(f, n) not in bad]
    for (clip, _), problem in zip(rest, parallel_map(_decode_problem, [p for _, p in rest], workers, "checking clips")):
        if problem:
            bad[clip] = problem
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
        try:
            return clip_features(self.paths[i], self.num_frames), int(self.labels[i])
        except AudioError as exc:
            raise AudioError(f"{exc} Replace the file or remove its row from the CSV.") from exc
