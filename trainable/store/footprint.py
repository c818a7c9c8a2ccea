"""How much disk a plan needs, from the model's parameter count, the trials left and the checkpoint policy, checked
against what is free before any trial starts. Torch- and Ray-free.

Bytes per parameter (P parameters): a resume point holds the float32 weights (4P) and AdamW's two moments (8P); the
best weights are float16 (2P); an exported model is float32 (4P). With ``--keep-checkpoints best`` a running trial
keeps one resume point plus the best weights, and holds two of each for a moment while a new checkpoint replaces the
old one; a finished trial keeps only its best weights. With ``all`` every epoch's checkpoint stays.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import AstCvError
from .storage import free_bytes, human_bytes, same_filesystem

RESUME_BYTES_PER_PARAM = 12  # float32 weights + AdamW exp_avg + exp_avg_sq
BEST_BYTES_PER_PARAM = 2  # float16
EXPORT_BYTES_PER_PARAM = 4  # float32
FEATURE_BYTES = 2  # the cache stores float16
OVERHEAD = 1.01  # JSON files, safetensors headers, metrics: measured under 1 % for AST-base (BENCHMARKS.md)


@dataclass(frozen=True)
class Footprint:
    """Disk needs of the trials still to run (bytes), and the size of one checkpoint write."""

    params: int
    trials_left: int
    at_once: int
    epochs: int
    keep: str
    refit: bool = False

    @property
    def resume_bytes(self) -> int:
        return int(self.params * RESUME_BYTES_PER_PARAM * OVERHEAD)

    @property
    def best_bytes(self) -> int:
        return int(self.params * BEST_BYTES_PER_PARAM * OVERHEAD)

    @property
    def export_bytes(self) -> int:
        return int(self.params * EXPORT_BYTES_PER_PARAM * OVERHEAD) * (2 if self.refit else 1)

    @property
    def checkpoint_bytes(self) -> int:
        """One checkpoint write of a running trial: the resume point and the best weights."""
        return self.resume_bytes + self.best_bytes

    @property
    def end_bytes(self) -> int:
        """What the trials left add by the end of the run (the exported model included)."""
        if self.keep == "all":
            return self.trials_left * self.epochs * self.checkpoint_bytes + self.export_bytes
        return self.trials_left * self.best_bytes + self.export_bytes

    @property
    def peak_bytes(self) -> int:
        """The most they add at any moment: trials running together while each replaces a checkpoint."""
        if self.keep == "all":
            return self.end_bytes
        running = min(self.at_once, self.trials_left)
        while_running = (self.trials_left - running) * self.best_bytes + running * 2 * self.checkpoint_bytes
        return max(while_running, self.end_bytes)

    @property
    def temp_bytes(self) -> int:
        """Local temporary files: each running trial writes its checkpoint to the temp folder before it is stored."""
        return min(self.at_once, self.trials_left) * self.checkpoint_bytes


def cache_bytes(clips: int, frames: int, mel_bins: int = 128) -> int:
    return clips * frames * mel_bins * FEATURE_BYTES


@dataclass(frozen=True)
class Need:
    """Bytes wanted on the filesystem holding ``path``, and what for."""

    path: str
    bytes: int
    what: str


def check_space(needs: list[Need], override: bool) -> list[str]:
    """Lines saying what each place needs and has free. Needs on one filesystem add up; when one does not fit, raise
    AstCvError with one line (unless ``override``: then the line is a warning among the others)."""
    lines, groups = [], []
    for need in needs:
        group = next((g for g in groups if same_filesystem(g[0].path, need.path)), None)
        if group is None:
            groups.append([need])
        else:
            group.append(need)
    for group in groups:
        total = sum(n.bytes for n in group)
        free = free_bytes(group[0].path)
        what = " + ".join(f"{n.what} {human_bytes(n.bytes)}" for n in group)
        if free is not None and total > free:
            paths = ", ".join(sorted({n.path for n in group}))
            message = (f"Not enough disk space: {paths} has {human_bytes(free)} free, the plan needs about "
                       f"{human_bytes(total)} there ({what}). Free space, put --storage-path or --cache-dir on a larger "
                       f"disk, or keep fewer checkpoints (--keep-checkpoints best); --no-space-check starts anyway.")
            if not override:
                raise AstCvError(message)
            lines.append("warning: " + message)
    return lines
