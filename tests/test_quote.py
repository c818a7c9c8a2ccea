"""Results people can quote (issue 25): intervals written unambiguously and kept within [0, 100] %, one learning-rate
format everywhere, figures for a paper's column in PNG, SVG and PDF, the README's FFmpeg-free pipeline call, and a
dataset check that summarizes by fold."""

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import orchestrate
from trainable.results.report import fmt_ci, render_report
from trainable.store.experiment import trial_dirname

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["air_conditioner", "car_horn", "children_playing", "dog_bark", "drilling", "engine_idling", "gun_shot",
           "jackhammer", "siren", "street_music"]


def test_an_interval_reads_as_from_to_and_says_when_a_bound_was_clipped():
    assert fmt_ci([0.213, 0.348]) == "95 % CI 21.30 to 34.80 %, corrected"
    assert fmt_ci([0.213, 0.348], corrected=False) == "95 % CI 21.30 to 34.80 %"
    low = fmt_ci([-0.0555, 0.6164])  # the headline that read "95 % CI -5.55-61.64 %"
    assert low.startswith("95 % CI 0.00 to 61.64 %") and "lower bound (-5.55 %) clipped to 0 %" in low
    high = fmt_ci([0.9, 1.031])
    assert high.startswith("95 % CI 90.00 to 100.00 %") and "upper bound (103.10 %) clipped to 100 %" in high
    assert fmt_ci(None) == "95 % CI n/a (one fold)"


def _summary(lr=1e-4):
    acc = {"1": 0.2, "2": 0.3, "3": 0.34}
    cm = [[5, 1], [2, 4]]
    return {"per_fold": [{"fold": int(f), "lr": lr, "batch_size": 8, "epoch": 2, "val_accuracy": 0.3, "test_accuracy": a}
                         for f, a in acc.items()],
            "mean": 0.28, "std": 0.07, "ci95": [-0.0555, 0.6164], "ci95_plain": [0.11, 0.45], "complete": True,
            "configs": [{"lr": lr, "batch_size": 8, "test_accuracy": acc, "mean": 0.28, "std": 0.07,
                         "mean_val_accuracy": 0.3}],
            "comparisons": [], "best_config": {"lr": lr, "batch_size": 8, "mean": 0.28, "std": 0.07,
                                               "mean_val_accuracy": 0.3, "folds": [1, 2, 3]},
            "best_model": None, "best_model_dir": None, "optimistic": {"lr": lr, "batch_size": 8, "mean": 0.28, "std": 0.07},
            "per_class_accuracy": {"a": 5 / 6, "b": 4 / 6}, "confusion_matrix": cm, "classes": ["a", "b"],
            "command": ["x"], "seed": 0, "git_commit": None, "versions": {}, "trials_finished": 3, "trials_expected": 3}


def test_report_and_console_write_the_interval_and_the_learning_rate_the_same_way(capsys):
    s = _summary()
    report = render_report(s)
    orchestrate.print_summary(s, "/runs/x")
    console = capsys.readouterr().out
    interval = fmt_ci(s["ci95"])
    assert interval in report and interval in console
    assert "-5.55-" not in report + console and "clipped to 0 %" in report
    name_lr = re.search(r"_lr(.+?)_bs", trial_dirname(1, 1e-4, 8))[1]
    assert name_lr == "1e-04"
    assert "0.0001" not in report + console and f"lr {name_lr}" in console and f"| {name_lr} |" in report


def _plot_inputs():
    rng = np.random.default_rng(0)
    configs, rows, info = [], {}, {}
    for lr in (1e-5, 5e-5):
        for bs in (8, 16):
            acc = {str(f): float(rng.uniform(0.6, 0.8)) for f in range(1, 11)}
            configs.append({"lr": lr, "batch_size": bs, "test_accuracy": acc, "mean": float(np.mean(list(acc.values()))),
                            "std": float(np.std(list(acc.values()), ddof=1))})
            for f in range(1, 11):
                info[trial_dirname(f, lr, bs)] = (f, lr, bs)
                rows[trial_dirname(f, lr, bs)] = [{"epoch": e, "val_accuracy": rng.uniform(0.4, 0.9),
                                                   "test_accuracy": rng.uniform(0.4, 0.9)} for e in (1, 2, 3)]
    cm = (rng.integers(0, 30, (10, 10)) + np.diag(rng.integers(300, 900, 10))).tolist()
    summary = {"configs": configs, "confusion_matrix": cm, "classes": CLASSES, "mean": 0.7,
               "per_class_accuracy": {c: cm[i][i] / sum(cm[i]) for i, c in enumerate(CLASSES)}}
    return summary, rows, info


def test_each_figure_is_png_svg_and_pdf_one_column_wide_readable_and_untitled(tmp_path):
    from PIL import Image

    from trainable.results import plots

    summary, rows, info = _plot_inputs()
    figures = {"fold_accuracy": plots.fold_accuracy(summary), "learning_curves": plots.learning_curves(rows, info),
               "confusion_matrix": plots.confusion_matrix(summary), "per_class_accuracy": plots.per_class_accuracy(summary)}
    for name, fig in figures.items():
        width, height = fig.get_size_inches()
        assert width == pytest.approx(3.3) and height < 6, name
        fig.canvas.draw()  # tick labels get their text when drawn
        texts = [t for t in fig.findobj(lambda o: hasattr(o, "get_fontsize") and hasattr(o, "get_text"))
                 if t.get_text().strip() and t.get_visible()]
        assert texts and min(t.get_fontsize() for t in texts) >= 8, name
        assert not fig._suptitle and all(not ax.get_title() for ax in fig.axes), name
        png = plots.save(fig, tmp_path, name)
        for ext in plots.FORMATS:
            assert png.with_suffix(f".{ext}").stat().st_size > 5_000, (name, ext)
        assert Image.open(png).size[0] == round(3.3 * plots.DPI)
    assert set(plots.FORMATS) == {"png", "svg", "pdf"}
    assert plots.PALETTE[:2] == ("#0072B2", "#D55E00")  # Okabe-Ito


def test_readme_pipeline_example_runs_without_ffmpeg(exported, tmp_path, monkeypatch, capsys):
    """The README's array form of transformers.pipeline runs as written (a 44.1 kHz stereo WAV, no FFmpeg on PATH)."""
    import soundfile as sf

    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme.split("## Use a trained model")[1], re.S)[1]
    assert "ffmpeg" not in code.lower() and '"sampling_rate": 16000' in code
    t = np.arange(int(1.5 * 44100)) / 44100
    sf.write(tmp_path / "clip.wav", np.stack([np.sin(2 * np.pi * 440 * t)] * 2, axis=1).astype(np.float32), 44100)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no ffmpeg to find
    exec(compile(code.replace("runs/ast-cv/best_model", str(exported)), "README", "exec"), {})
    out = capsys.readouterr().out
    assert out.count("'label'") == 3 and any(c in out for c in CLASSES)


def test_verify_on_a_dataset_missing_folds_summarizes_by_fold_first(tmp_path, capsys):
    from test_results import _fake_us8k
    from trainable.data.metadata import main

    _fake_us8k(tmp_path)
    for fold in range(4, 10):
        shutil.rmtree(tmp_path / "audio" / f"fold{fold}")
    for path in sorted((tmp_path / "audio" / "fold3").iterdir())[:12]:
        path.unlink()
    assert main(["verify", "--data-root", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if "files missing" in line)
    assert lines[at + 1].startswith("  folds missing entirely: 4, 5, 6, 7, 8, 9 (")
    assert lines[at + 2].startswith("  folds missing in part: fold 3 (12 of ")
    assert lines[at + 3].startswith("  e.g. fold3/") and "more" in lines[at + 3]
