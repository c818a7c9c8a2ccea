import numpy as np
import pytest
import torch
from transformers import ASTFeatureExtractor

from trainable.data.features import AUDIOSET_MEAN, AUDIOSET_STD, fbank, frames_for_seconds, recipe_fingerprint
from trainable.data.synth import class_signal


@pytest.mark.parametrize("num_samples", [400, 1600, 16000, 64000, 163840, 200000])
@pytest.mark.parametrize("max_length", [1024, 400])
def test_parity_with_ast_feature_extractor(num_samples, max_length):
    rng = np.random.default_rng(num_samples)
    wave = class_signal(num_samples % 10, num_samples / 16000, 16000, rng).astype(np.float32)
    ours = fbank(torch.from_numpy(wave), num_frames=max_length)
    extractor = ASTFeatureExtractor(max_length=max_length)
    theirs = extractor(wave, sampling_rate=16000, return_tensors="pt").input_values[0]
    assert ours.shape == theirs.shape == (max_length, 128)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_pads_frames_with_zero_before_normalization_and_cuts_long_input():
    wave = torch.randn(16000) * 0.1  # 98 frames
    feats = fbank(wave, num_frames=200)
    n = frames_for_seconds(1.0)
    assert n == 98
    pad_value = (0 - AUDIOSET_MEAN) / (2 * AUDIOSET_STD)
    assert torch.allclose(feats[n:], torch.full_like(feats[n:], pad_value))
    assert not torch.allclose(feats[n - 1], torch.full_like(feats[n - 1], pad_value))
    assert torch.equal(fbank(wave, num_frames=50), feats[:50])


def test_clip_shorter_than_one_window_gives_one_frame():
    feats = fbank(torch.randn(100) * 0.1, num_frames=10)
    pad_value = (0 - AUDIOSET_MEAN) / (2 * AUDIOSET_STD)
    assert not torch.allclose(feats[0], torch.full_like(feats[0], pad_value))
    assert torch.allclose(feats[1:], torch.full_like(feats[1:], pad_value))


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        fbank(torch.zeros(2, 16000))
    with pytest.raises(ValueError):
        fbank(torch.zeros(16000), num_frames=0)


def test_recipe_fingerprint_changes_with_settings():
    assert recipe_fingerprint(1024) == recipe_fingerprint(1024)
    assert recipe_fingerprint(1024) != recipe_fingerprint(400)
    assert recipe_fingerprint(1024) != recipe_fingerprint(1024, mean=0.0)
