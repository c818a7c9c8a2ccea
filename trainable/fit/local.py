"""The one-fold command line without Ray: the code path every trial runs, with its files in one folder.

    python -m trainable.fit --data-root DIR --model M --folds 1 2 10 --test-fold 1 --epochs 2 --output OUT

OUT holds metrics.jsonl (one line per epoch), last/ (the latest checkpoint: the resume point), best/ (the best epoch's
weights in float16, Hugging Face format) and tensorboard/. Re-running the same command resumes after the last finished
epoch, also after a kill in the middle of writing a checkpoint or between last/ and best/.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

from .checkpoint import read_trainer_state
from ..cli import run_cli
from ..config import add_config_arguments, config_from_args
from ..errors import AstCvError
from ..store.experiment import BEST_DIR, BEST_EPOCH, BEST_INFO, EPOCH, TRAINER_STATE

log = logging.getLogger(__name__)


def replace_dir(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` so that ``dst`` or ``dst.old`` always holds a complete copy (see ``recover_dir``)."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(dst: Path) -> None:
    """After a kill between ``replace_dir``'s two renames only ``dst.old`` is complete: move it back."""
    old = dst.with_name(dst.name + ".old")
    if not dst.exists() and old.is_dir():
        old.rename(dst)
        log.warning("recovered %s from %s (a previous run was stopped while replacing it)", dst, old.name)
    shutil.rmtree(dst.with_name(dst.name + ".tmp"), ignore_errors=True)


def _best_epoch(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / BEST_INFO).read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return None


class LocalRun:
    """Reporter for runs without Ray: ``metrics.jsonl``, ``last/``, ``best/`` and ``tensorboard/`` under ``out``."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        recover_dir(self.last)
        recover_dir(self.best)
        self.repair_best()

    def repair_best(self) -> None:
        """After a kill between writing last/ and best/, best/ is missing or an older epoch's: last/ holds the
        right one (every checkpoint carries the best weights so far)."""
        held = self.last / BEST_DIR
        if not (held / BEST_INFO).is_file():
            return
        if _best_epoch(self.best) != _best_epoch(held):
            log.warning("best/ did not match last/ (a previous run was stopped between the two): restored from last/")
            replace_dir(held, self.best)

    @property
    def last(self) -> Path:
        return self.out / "last"

    @property
    def best(self) -> Path:
        return self.out / "best"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"

    def resume_point(self) -> Path | None:
        return self.last if (self.last / TRAINER_STATE).is_file() else None

    def __call__(self, metrics: dict[str, Any], ckpt_dir: Path) -> None:
        replace_dir(ckpt_dir, self.last)
        if metrics[BEST_EPOCH] == metrics[EPOCH]:
            replace_dir(ckpt_dir / BEST_DIR, self.best)
        # Metrics last: a line in metrics.jsonl means its checkpoint is on disk.
        with open(self.metrics, "a") as fh:
            fh.write(json.dumps(metrics) + "\n")

    def rewrite_metrics(self, history: list[dict[str, Any]]) -> None:
        """Make metrics.jsonl hold exactly the epochs of the checkpoint being resumed (none when starting over)."""
        self.metrics.write_text("".join(json.dumps(m) + "\n" for m in history))

    def clear(self) -> None:
        for p in (self.last, self.best):
            shutil.rmtree(p, ignore_errors=True)
        self.metrics.unlink(missing_ok=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainable.fit",
        description="Fine-tune AST on one fold with one configuration, without Ray (the code path every trial runs).",
    )
    add_config_arguments(parser)
    parser.add_argument("--output", required=True, help="folder for metrics.jsonl, last/ (resume point) and best/ (best epoch, HF format)")
    parser.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --output and start over")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def run(args: argparse.Namespace) -> int:
    from .train import fit

    if not args.data_root:
        raise AstCvError("--data-root is required: the UrbanSound8K folder (or one made by python -m trainable.data.synth).")
    config_from_args(args, num_frames=1024)  # the other settings are checked before the data is read
    if args.num_frames == "auto":
        from ..data.audio import auto_num_frames
        from ..data.metadata import load_metadata

        args.num_frames = auto_num_frames(args.data_root, load_metadata(args.data_root, args.folds))
        log.info("--num-frames auto: %d frames", args.num_frames)
    config = config_from_args(args)
    run = LocalRun(args.output)
    if args.fresh:
        run.clear()
    restore = run.resume_point()
    if restore is not None:
        previous = read_trainer_state(restore)
        if previous.config != config.to_dict():
            raise AstCvError(f"{args.output} holds a run with a different config; pass --fresh to start over or another --output.")
    run.rewrite_metrics(previous.history if restore is not None else [])
    from .curves import LiveCurves, hparams_of

    curves = LiveCurves(run.out / "tensorboard", hparams_of(config))  # tensorboard --logdir OUT/tensorboard

    def report(metrics: dict[str, Any], ckpt_dir: Path) -> None:
        curves.epoch(metrics)
        run(metrics, ckpt_dir)

    finished = False
    try:
        state = fit(config, report, restore_dir=restore, on_step=curves.step, on_progress=lambda m: log.info(
            "epoch %d, %s: batch %d/%d, %.1f samples/s", m["epoch"], m["phase"], m["step"], m["steps"], m["samples_per_s"]))
        finished = True
    finally:
        curves.close(finished)
    print(f"best epoch {state.best_epoch}: val_accuracy {state.best_val_accuracy:.4f}, test_accuracy "
          f"{state.best_test_accuracy:.4f}; model in {run.best}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run_cli(lambda: run(args), args.debug)

