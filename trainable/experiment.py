"""What an experiment folder holds besides Ray's files: the run manifest and the trial naming scheme.

Ray-free, so the reducer can read a finished or partial experiment anywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "astcv_run.json"
SUMMARY = "summary.json"
PER_TRIAL_CSV = "per_trial.csv"
REPORT = "report.md"
BEST_MODEL = "best_model"
FINAL_MODEL = "final_model"


def format_lr(lr: float) -> str:
    """Short exact learning-rate text for folder names: 5e-05, 1e-03, 2.5e-05."""
    mantissa, exponent = f"{lr:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{exponent}"


def trial_dirname(test_fold: int, lr: float, batch_size: int) -> str:
    """Readable trial folder name, e.g. ``fold03_lr5e-05_bs16``."""
    return f"fold{int(test_fold):02d}_lr{format_lr(float(lr))}_bs{int(batch_size)}"


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "torchaudio", "transformers", "ray", "ast-cv"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit(path: Path | None = None) -> str | None:
    """The project's git commit (with '-dirty' if changed), or None outside a checkout."""
    here = path or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_manifest(exp_dir: Path, **fields: Any) -> Path:
    """Record how the experiment was started (command, config, grid, classes, versions, commit)."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": package_versions(), "git_commit": git_commit()}
    manifest.update(fields)
    path = exp_dir / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(path)
    return path


def read_manifest(exp_dir: Path) -> dict[str, Any] | None:
    path = Path(exp_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None
