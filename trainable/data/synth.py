"""Generate an UrbanSound8K-shaped dataset: the real folder layout, CSV columns, class names and WAV variety.

Each class has its own learnable sound character (tone bands, noise colour, pulse rate, chirps, sweeps) with
random variation, clips last 0.1 s to 4 s, and the file kinds of the real dataset (8-bit unsigned, 16/24/32-bit
PCM, 32/64-bit float, WAVE_FORMAT_EXTENSIBLE, IMA ADPCM, mono and stereo, 8 to 192 kHz) are spread over every fold.
Deterministic for a given seed.

    python -m trainable.data.synth --out DIR [--clips-per-class 3] [--folds 1 2 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import soundfile as sf

from .metadata import ALL_FOLDS, AUDIO_DIRNAME, METADATA_RELPATH, REQUIRED_COLUMNS, US8K_CLASSES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WavKind:
    """One on-disk encoding found in UrbanSound8K."""

    format: str
    subtype: str
    channels: int
    sample_rate: int

    @property
    def label(self) -> str:
        ch = "stereo" if self.channels == 2 else "mono"
        return f"{self.format}/{self.subtype}/{ch}/{self.sample_rate}Hz"


# The variety of the real dataset; clip i of a fold uses WAV_KINDS[(i + fold) % len], so every fold gets many kinds.
WAV_KINDS = (
    WavKind("WAV", "PCM_16", 2, 44100),
    WavKind("WAV", "PCM_U8", 1, 8000),
    WavKind("WAV", "PCM_24", 2, 48000),
    WavKind("WAV", "PCM_32", 1, 96000),
    WavKind("WAV", "FLOAT", 1, 22050),
    WavKind("WAV", "DOUBLE", 2, 32000),
    WavKind("WAVEX", "PCM_16", 1, 16000),
    WavKind("WAV", "IMA_ADPCM", 1, 11025),
    WavKind("WAV", "PCM_24", 1, 192000),
    WavKind("WAVEX", "FLOAT", 2, 24000),
)

MIN_SECONDS = 0.1
MAX_SECONDS = 4.0


def _noise(rng: np.random.Generator, n: int, colour: float) -> np.ndarray:
    """Noise with power spectrum ~ 1/f**colour (0 white, 1 pink, 2 brown), unit peak."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spec.size, dtype=np.float64)
    f[0] = 1.0
    x = np.fft.irfft(spec / f ** (colour / 2), n)
    return x / (np.abs(x).max() + 1e-9)


def _tone(t: np.ndarray, freq: float | np.ndarray) -> np.ndarray:
    return np.sin(2 * np.pi * freq * t)


def _pulses(t: np.ndarray, rate: float, width: float) -> np.ndarray:
    """Exponentially decaying pulses at ``rate`` per second, each ``width`` seconds long."""
    phase = (t * rate) % 1.0
    return np.exp(-phase / (width * rate))


def class_signal(class_id: int, seconds: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """One clip of class ``class_id`` (0..9, UrbanSound8K's order), mono float64 in [-1, 1]."""
    n = max(1, int(round(seconds * sample_rate)))
    t = np.arange(n) / sample_rate
    j = lambda: rng.uniform(0.9, 1.1)  # noqa: E731  +-10 % variation of every characteristic
    if class_id == 0:  # air_conditioner: brown noise and mains hum
        x = _noise(rng, n, 2.0) + 0.3 * _tone(t, 120 * j())
    elif class_id == 1:  # car_horn: steady two-tone harmonic chord
        f = 420 * j()
        x = _tone(t, f) + 0.6 * _tone(t, 1.25 * f) + 0.3 * _tone(t, 2 * f)
    elif class_id == 2:  # children_playing: random high chirps over pink noise
        x = 0.2 * _noise(rng, n, 1.0)
        f = 1200 * j() + 500 * np.sin(2 * np.pi * 3 * j() * t)
        x += _tone(t, f) * (rng.random(n // max(1, sample_rate // 20) + 1).repeat(max(1, sample_rate // 20))[:n] > 0.5)
    elif class_id == 3:  # dog_bark: short noisy 600 Hz barks, ~2.5 per second
        x = (_tone(t, 600 * j()) + 0.5 * _noise(rng, n, 0.0)) * _pulses(t, 2.5 * j(), 0.08)
    elif class_id == 4:  # drilling: 2.5 kHz whine, amplitude-modulated at 30 Hz
        x = _tone(t, 2500 * j()) * (0.6 + 0.4 * _tone(t, 30 * j()))
    elif class_id == 5:  # engine_idling: low harmonic pulse train around 40 Hz
        f0 = 40 * j()
        x = sum(_tone(t, k * f0) / k for k in range(1, 8))
    elif class_id == 6:  # gun_shot: one broadband impulse with a fast decay
        start = rng.uniform(0, 0.3) * seconds
        x = _noise(rng, n, 0.0) * np.where(t >= start, np.exp(-(t - start) / (0.05 * j())), 0.0)
    elif class_id == 7:  # jackhammer: broadband bursts at ~12 per second
        x = _noise(rng, n, 0.5) * _pulses(t, 12 * j(), 0.03)
    elif class_id == 8:  # siren: tone sweeping 600-1400 Hz
        rate = 0.8 * j()
        inst = 1000 * j() + 400 * np.sin(2 * np.pi * rate * t)
        x = _tone(np.ones_like(t), np.cumsum(inst) / sample_rate)
    elif class_id == 9:  # street_music: major triad with a 2 Hz rhythm
        f = 330 * j()
        x = (_tone(t, f) + _tone(t, f * 1.26) + _tone(t, f * 1.5)) * (0.5 + 0.5 * (np.sin(2 * np.pi * 2 * t) > 0))
    else:
        raise ValueError(f"class_id must be 0..9, got {class_id}")
    x = np.asarray(x, dtype=np.float64)
    x = x / (np.abs(x).max() + 1e-9)
    x = x * rng.uniform(0.2, 0.8) + 0.01 * rng.standard_normal(n)
    return np.clip(x, -1.0, 1.0)


def write_clip(path: Path, mono: np.ndarray, kind: WavKind) -> None:
    """Write a mono float signal in ``kind``'s encoding (stereo kinds get a slightly different second channel)."""
    data = np.stack([mono, 0.9 * mono], axis=1) if kind.channels == 2 else mono
    sf.write(str(path), data, kind.sample_rate, subtype=kind.subtype, format=kind.format)


def generate(
    out: str | Path,
    clips_per_class: int = 3,
    folds: Sequence[int] = ALL_FOLDS,
    seed: int = 0,
    min_seconds: float = MIN_SECONDS,
    max_seconds: float = MAX_SECONDS,
) -> pd.DataFrame:
    """Write an UrbanSound8K-shaped dataset under ``out`` and return its metadata.

    ``clips_per_class`` clips of each of the 10 classes in each fold; clips from one generated "recording"
    (fsID) share a fold, as in the real dataset.
    """
    out = Path(out)
    rows = []
    for fold in folds:
        fold_dir = out / AUDIO_DIRNAME / f"fold{fold}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        i = 0
        for class_id, name in enumerate(US8K_CLASSES):
            for k in range(clips_per_class):
                rng = np.random.default_rng([seed, fold, class_id, k])
                fs_id = 100_000 + fold * 1_000 + class_id * 100 + k // 2  # two slices per recording
                slice_no = k % 2
                # Log-uniform lengths cover the range; every fold also gets one clip at each extreme.
                if k == 0 and class_id == 0:
                    seconds = min_seconds
                elif k == 0 and class_id == 1:
                    seconds = max_seconds
                else:
                    seconds = float(np.exp(rng.uniform(np.log(min_seconds), np.log(max_seconds))))
                kind = WAV_KINDS[(i + fold) % len(WAV_KINDS)]
                file_name = f"{fs_id}-{class_id}-0-{slice_no}.wav"
                write_clip(fold_dir / file_name, class_signal(class_id, seconds, kind.sample_rate, rng), kind)
                start = round(slice_no * max_seconds, 3)
                rows.append((file_name, fs_id, start, round(start + seconds, 3), 1 + (k % 2), fold, class_id, name))
                i += 1
    meta = pd.DataFrame(rows, columns=list(REQUIRED_COLUMNS))
    (out / METADATA_RELPATH).parent.mkdir(parents=True, exist_ok=True)
    meta.to_csv(out / METADATA_RELPATH, index=False)
    log.info("wrote %d clips in %d folds to %s", len(meta), len(folds), out)
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainable.data.synth",
        description="Write a generated UrbanSound8K-shaped dataset (for the demo and the tests).",
    )
    parser.add_argument("--out", required=True, help="folder to write (audio/fold1..10 and metadata/UrbanSound8K.csv)")
    parser.add_argument("--clips-per-class", type=int, default=3, help="clips of each class in each fold (default: 3)")
    parser.add_argument("--folds", type=int, nargs="+", default=list(ALL_FOLDS), help="folds to write (default: 1..10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files")
    parser.add_argument("--max-seconds", type=float, default=MAX_SECONDS, help="longest clip in seconds (default: 4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.clips_per_class < 1:
        parser.error("--clips-per-class must be >= 1")
    if any(f not in ALL_FOLDS for f in args.folds):
        parser.error("--folds must be within 1..10")
    meta = generate(args.out, args.clips_per_class, args.folds, args.seed, max_seconds=args.max_seconds)
    print(f"Wrote {len(meta)} clips to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
