#!/usr/bin/env python
"""Classify audio files with a trained ast-cv model (best_model/ or final_model/ of an experiment).

    python predict.py --model runs/ast-cv/best_model clip.wav more.wav some_folder/ --top-k 3 [--json]

Any WAV kind the data layer reads is accepted; clips longer than the model's window are cut into half-overlapping
windows whose class probabilities are averaged (``--batch-size`` windows per forward pass, so memory stays bounded
however long the file). A file that cannot be read is reported and the others go on (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from trainable.data.audio import AudioError, load_audio
from trainable.cli import run_cli
from trainable.errors import AstCvError
from trainable.data.features import AUDIOSET_MEAN, AUDIOSET_STD, FRAME_SHIFT_MS, SAMPLE_RATE, WINDOW_SAMPLES, fbank

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".aiff", ".aif")
HOP = int(SAMPLE_RATE * FRAME_SHIFT_MS / 1000)


def load_classifier(model_dir: str | Path):
    """(model, num_frames, mean, std) from an exported folder (config.json + preprocessor_config.json)."""
    from transformers import ASTForAudioClassification

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise AstCvError(f"{model_dir} holds no config.json: pass --model with an exported folder such as runs/NAME/best_model.")
    try:
        model = ASTForAudioClassification.from_pretrained(model_dir).eval()
        pre = model_dir / "preprocessor_config.json"
        fe = json.loads(pre.read_text()) if pre.is_file() else {}
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged config.json, weights or preprocessor file
        raise AstCvError(f"Cannot load the model in {model_dir} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
                         f"The folder is damaged: export it again (orchestrate.py --report-only EXPERIMENT).") from None
    return model, int(fe.get("max_length", model.config.max_length)), float(fe.get("mean", AUDIOSET_MEAN)), float(fe.get("std", AUDIOSET_STD))


def windows(wave: torch.Tensor, num_frames: int) -> list[torch.Tensor]:
    """Cut a waveform into windows of ``num_frames`` frames with 50 % overlap (one window if it fits)."""
    size = (num_frames - 1) * HOP + WINDOW_SAMPLES
    if wave.numel() <= size:
        return [wave]
    step = size // 2
    starts = list(range(0, wave.numel() - size + 1, step))
    if starts[-1] + size < wave.numel():
        starts.append(wave.numel() - size)
    return [wave[s : s + size] for s in starts]


@torch.no_grad()
def predict_file(model, path: Path, num_frames: int, mean: float, std: float, batch_size: int = 8) -> torch.Tensor:
    """Class probabilities of one file, averaged over its windows, ``batch_size`` windows per forward pass."""
    wins = windows(load_audio(path), num_frames)
    total = None
    for start in range(0, len(wins), batch_size):
        feats = torch.stack([fbank(w, num_frames, mean, std) for w in wins[start : start + batch_size]])
        probs = model(input_values=feats).logits.softmax(-1).sum(0)
        total = probs if total is None else total + probs
    return total / len(wins)


def expand(paths: Sequence[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise AstCvError(f"{p} does not exist.")
    if not out:
        raise AstCvError(f"No audio files found in {', '.join(paths)} (looked for {', '.join(AUDIO_SUFFIXES)}).")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="predict.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model folder (runs/NAME/best_model or final_model)")
    p.add_argument("inputs", nargs="+", help="audio files or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=3, help="labels to show per file (default: 3)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="windows of a long file per forward pass: bounds memory, same result (default: 8)")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of text (failed files carry 'error')")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def classify(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.top_k < 1:
        raise AstCvError("--batch-size and --top-k must be at least 1.")
    model, num_frames, mean, std = load_classifier(args.model)
    results, failed = [], 0
    for path in expand(args.inputs):
        try:
            probs = predict_file(model, path, num_frames, mean, std, args.batch_size)
        except AudioError as exc:
            failed += 1
            results.append({"file": str(path), "error": str(exc)})
            print(f"error: {exc}", file=sys.stderr, flush=True)
            continue
        top = probs.topk(min(args.top_k, probs.numel()))
        labels = [{"label": model.config.id2label[int(i)], "score": float(s)} for s, i in zip(top.values, top.indices)]
        results.append({"file": str(path), "predictions": labels})
        if not args.json:
            print(f"{path}: " + ", ".join(f"{l['label']} {l['score']:.3f}" for l in labels), flush=True)
    if args.json:
        print(json.dumps(results, indent=1))
    if failed:
        print(f"{failed} of {len(results)} file(s) could not be read (see above).", file=sys.stderr)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: classify(args), args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
