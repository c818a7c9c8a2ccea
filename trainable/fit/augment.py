"""Training-time augmentation of the official AST recipe (YuanGongND/ast, ``src/dataloader.py``): SpecAugment and
mixup, applied per clip to a training batch after the feature cache, never at evaluation.

Randomness comes only from the ``torch.Generator`` passed in (``epoch_generator``: a function of the trial's seed and
the epoch), so a run resumed at an epoch boundary draws the same masks and the same mixing as an uninterrupted one.

How this follows the official code, and where it cannot:

- SpecAugment: the official loader calls ``torchaudio.transforms.FrequencyMasking(freqm)`` then
  ``TimeMasking(timem)`` on each clip's fbank: one band per axis, width ``floor(U * F)`` with U ~ Uniform[0, 1) (so
  uniform over the whole numbers 0..F-1), start ``floor(U' * (size - width_real))``. ``mask_clip`` draws the same
  numbers in the same order (``mask_clip`` with a generator seeded s equals torchaudio under ``torch.manual_seed(s)``,
  tests/test_recipe.py). The official code masks the fbank *before* normalising it, i.e. with 0 in log-mel units;
  the feature cache holds normalised features, so the masked value here is that 0 normalised (``MASK_VALUE``).
- mixup: with probability ``mixup`` a clip is mixed with another one, λ ~ Beta(10, 10), the target
  λ·onehot(a) + (1-λ)·onehot(b). The official loader picks the partner from the whole training set and mixes the
  *waveforms* before the fbank; here the partner is drawn from the same batch and the (cached) features are mixed.
  The official ESC-50 recipe uses mixup 0 (AudioSet 0.5). With cross-entropy the official training loop takes
  ``argmax(labels.long())`` of the mixed labels (a hard label); here the loss is on the soft targets.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.features import AUDIOSET_MEAN, AUDIOSET_STD

MIXUP_BETA = 10.0  # λ ~ Beta(10, 10): np.random.beta(10, 10) in the official dataloader
MASK_VALUE = (0.0 - AUDIOSET_MEAN) / (2 * AUDIOSET_STD)  # the official masks' 0 (raw fbank), as the cache stores it


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The augmentation's generator for one epoch of a trial (seeded from (seed, epoch) only, so resumes repeat it)."""
    return torch.Generator().manual_seed((seed * 100_003 + epoch) * 2 + 1)  # apart from the data order's seeds


def _band(size: int, mask_param: int, generator: torch.Generator) -> tuple[int, int]:
    """(start, end) of one band, as ``torchaudio.functional.mask_along_axis`` draws it."""
    value = torch.rand(1, generator=generator) * mask_param
    min_value = torch.rand(1, generator=generator) * (size - value)
    start = int(min_value.long())
    return start, start + int(value.long())


def mask_clip(features: torch.Tensor, freqm: int, timem: int, generator: torch.Generator,
              mask_value: float = MASK_VALUE) -> torch.Tensor:
    """One clip's features [T, F] with a frequency band (width < ``freqm``) then a time band (width < ``timem``)
    masked; a parameter 0 masks nothing and draws nothing, as in the official loader."""
    out = features.clone()
    if freqm:
        lo, hi = _band(out.shape[1], freqm, generator)
        out[:, lo:hi] = mask_value
    if timem:
        lo, hi = _band(out.shape[0], timem, generator)
        out[lo:hi, :] = mask_value
    return out


def spec_augment(x: torch.Tensor, freqm: int, timem: int, generator: torch.Generator) -> torch.Tensor:
    """A batch [B, T, F] with each clip masked on its own (``mask_clip``)."""
    if not (freqm or timem):
        return x
    return torch.stack([mask_clip(clip, freqm, timem, generator) for clip in x])


def mixup(x: torch.Tensor, y: torch.Tensor, num_classes: int, p: float,
          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mixed features, soft targets [B, C], λ per clip) : clip i is mixed with probability ``p`` with a partner
    drawn uniformly from the batch, λ_i ~ Beta(10, 10); an unmixed clip has λ 1 and its one-hot target."""
    n = x.shape[0]
    mixed = torch.rand(n, generator=generator) < p
    partner = torch.randint(0, n, (n,), generator=generator)
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    lam = torch.from_numpy(rng.beta(MIXUP_BETA, MIXUP_BETA, size=n)).float()
    lam = torch.where(mixed, lam, torch.ones_like(lam))
    onehot = torch.nn.functional.one_hot(y, num_classes).float()
    shape = (n,) + (1,) * (x.dim() - 1)
    out = lam.view(shape).to(x.dtype) * x + (1 - lam.view(shape)).to(x.dtype) * x[partner]
    return out, lam[:, None] * onehot + (1 - lam[:, None]) * onehot[partner], lam


class Augment:
    """A training batch's augmentation for one epoch: mixup (if ``mixup`` > 0), then SpecAugment on each clip (the
    official order: the loader mixes, then masks). Returns (features, targets): class indices when nothing is mixed,
    soft targets [B, C] with mixup."""

    def __init__(self, freqm: int, timem: int, mixup: float, num_classes: int, generator: torch.Generator):
        self.freqm, self.timem, self.p, self.num_classes, self.generator = freqm, timem, mixup, num_classes, generator

    @property
    def active(self) -> bool:
        return bool(self.freqm or self.timem or self.p > 0)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target = y
        if self.p > 0:
            x, target, _ = mixup(x, y, self.num_classes, self.p, self.generator)
        return spec_augment(x, self.freqm, self.timem, self.generator), target


def soft_cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Summed cross-entropy against class indices (``ignore_index`` rows count nothing) or soft targets [B, C]
    (all-zero rows, the padding, count nothing)."""
    if target.is_floating_point():
        return -(target * torch.log_softmax(logits, dim=-1)).sum()
    return torch.nn.functional.cross_entropy(logits, target, reduction="sum", ignore_index=ignore_index)
