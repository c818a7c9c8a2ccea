"""AST input features: kaldi log-mel filterbank exactly as the pretrained AST (and ASTFeatureExtractor) computes it.

Pure functions: waveform in, tensor out. No I/O, no randomness.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torchaudio.compliance.kaldi as kaldi

SAMPLE_RATE = 16_000  # AST was pretrained on 16 kHz audio.
NUM_MEL_BINS = 128  # AST's patch grid is built on 128 mel bins.
FRAME_SHIFT_MS = 10.0  # 10 ms hop: 1024 frames = 10.24 s.
FRAME_LENGTH_MS = 25.0  # 25 ms window.
WINDOW_SAMPLES = int(SAMPLE_RATE * FRAME_LENGTH_MS / 1000)  # 400 samples: kaldi needs at least one window.
DEFAULT_NUM_FRAMES = 1024  # AudioSet checkpoint's max_length (10 s clips).
AUDIOSET_MEAN = -4.2677393  # AudioSet fbank mean, as used by the pretrained checkpoint.
AUDIOSET_STD = 4.5689974  # AudioSet fbank std; dividing by 2*std gives outputs of std ~0.5.


def fbank(
    waveform: torch.Tensor,
    num_frames: int = DEFAULT_NUM_FRAMES,
    mean: float = AUDIOSET_MEAN,
    std: float = AUDIOSET_STD,
) -> torch.Tensor:
    """Return normalized AST features, shape [num_frames, 128], from a 1-D 16 kHz float waveform.

    Like AST and ASTFeatureExtractor: kaldi fbank (hanning window, htk mel scale, no energy, no dither),
    then the *frames* are zero-padded or cut to ``num_frames``, then ``(x - mean) / (2 * std)``.
    A clip shorter than one 25 ms window is zero-padded to one window first (kaldi needs one full frame).
    """
    if waveform.dim() != 1:
        raise ValueError(f"fbank expects a 1-D waveform, got shape {tuple(waveform.shape)}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    waveform = waveform.to(torch.float32)
    if waveform.numel() < WINDOW_SAMPLES:
        waveform = torch.nn.functional.pad(waveform, (0, WINDOW_SAMPLES - waveform.numel()))
    feats = kaldi.fbank(
        waveform.unsqueeze(0),
        sample_frequency=SAMPLE_RATE,
        htk_compat=True,
        window_type="hanning",
        num_mel_bins=NUM_MEL_BINS,
        use_energy=False,
        dither=0.0,
        frame_shift=FRAME_SHIFT_MS,
        frame_length=FRAME_LENGTH_MS,
    )
    n = feats.shape[0]
    if n < num_frames:
        feats = torch.nn.functional.pad(feats, (0, 0, 0, num_frames - n))
    elif n > num_frames:
        feats = feats[:num_frames]
    return (feats - mean) / (2 * std)


def frames_for_seconds(seconds: float) -> int:
    """Number of fbank frames kaldi produces for ``seconds`` of 16 kHz audio (snip_edges=True)."""
    samples = int(round(seconds * SAMPLE_RATE))
    shift = int(SAMPLE_RATE * FRAME_SHIFT_MS / 1000)
    if samples < WINDOW_SAMPLES:
        return 1
    return 1 + (samples - WINDOW_SAMPLES) // shift


def recipe_fingerprint(num_frames: int, mean: float = AUDIOSET_MEAN, std: float = AUDIOSET_STD) -> str:
    """A short hash of every setting that changes the features (used to key the feature cache)."""
    recipe = {
        "sample_rate": SAMPLE_RATE,
        "num_mel_bins": NUM_MEL_BINS,
        "frame_shift_ms": FRAME_SHIFT_MS,
        "frame_length_ms": FRAME_LENGTH_MS,
        "window": "hanning",
        "htk_compat": True,
        "num_frames": num_frames,
        "mean": mean,
        "std": std,
        "version": 1,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
