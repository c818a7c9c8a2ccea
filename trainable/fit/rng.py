"""A trial's randomness as a pure function of (trial seed, epoch): what makes a resumed trial equal an uninterrupted one.

An epoch run after a resume must see exactly what it would have seen uninterrupted, whatever ran before it in the
process (an earlier epoch, the restore, a model load, a half-finished epoch, another trial in a reused Ray worker).
So nothing carries randomness from one epoch to the next:

- the training order comes from ``EpochShuffle``, a sampler that draws each epoch's permutation from its own
  generator seeded with (seed, epoch), never from the DataLoader's or the global generator (with persistent loader
  workers, torch draws the workers' base seed from the loader's generator on the first epoch only: an order taken
  from that generator shifts on the first epoch after a resume);
- every DataLoader gets its own generator (``worker_generator``), so creating an iterator (which draws a base seed)
  never advances the global RNG that dropout uses;
- the global RNGs (Python, NumPy, torch CPU and CUDA: dropout, anything drawn without a generator) are reseeded at
  the start of each epoch by ``seed_epoch``;
- other per-epoch randomness (augmentation) draws from ``epoch_generator(seed, epoch, stream)`` with a stream of its own.

Randomness inside a Dataset run by loader workers is not covered (persistent workers keep their RNG across epochs):
draw it in the training process from ``epoch_generator``, or derive it from (seed, epoch, clip index).
"""

from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

# Independent streams of one (seed, epoch): each use draws from its own, so adding one changes no other.
SHUFFLE, GLOBAL, WORKERS, AUGMENT = 0, 1, 2, 3


def stream_seed(seed: int, epoch: int, stream: int) -> int:
    """A 64-bit seed mixed from (seed, epoch, stream) (NumPy's SeedSequence: nearby inputs give unrelated seeds)."""
    words = [seed % 2**64, epoch % 2**64, stream % 2**64]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


def epoch_generator(seed: int, epoch: int, stream: int = AUGMENT, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh generator for one epoch's draws of ``stream``: the same after a resume as uninterrupted."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, epoch, stream))


def worker_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator (for the workers' base seed), so iterating it never draws from the global RNG."""
    return epoch_generator(seed, 0, WORKERS)


def seed_epoch(seed: int, epoch: int) -> None:
    """Reseed the global RNGs (Python, NumPy, torch CPU and every CUDA device) for ``epoch``: dropout and any draw
    without a generator then repeat whether the trial ran epoch ``epoch - 1`` in this process or resumed after it."""
    s = stream_seed(seed, epoch, GLOBAL)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)  # also seeds all CUDA devices


class EpochShuffle(Sampler[int]):
    """Sampler: a permutation of ``range(n)`` that depends only on (seed, epoch); call ``set_epoch`` before iterating."""

    def __init__(self, n: int, seed: int, epoch: int = 1):
        self.n, self.seed, self.epoch = n, seed, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch, SHUFFLE)).tolist()


def start_epoch(seed: int, epoch: int, sampler: EpochShuffle) -> None:
    """What each epoch of a trial (or the refit) does first: its data order and its global RNG state."""
    sampler.set_epoch(epoch)
    seed_epoch(seed, epoch)
