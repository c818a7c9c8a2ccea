"""Predict CLI, dataset verification and environment.yml (the Colab notebook: test_colab.py)."""

import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import predict
from trainable.data.metadata import US8K_CLASSES, US8K_FOLD_SIZES, main as data_main, verify_dataset
from trainable.data.synth import WAV_KINDS, class_signal, write_clip

ROOT = Path(__file__).resolve().parent.parent


def test_predict_agrees_with_the_transformers_pipeline(exported, tmp_path, capsys):
    from transformers import pipeline

    clf = pipeline("audio-classification", model=str(exported))
    files = []
    for class_id, kind in ((8, WAV_KINDS[0]), (5, WAV_KINDS[7]), (3, WAV_KINDS[3])):
        path = tmp_path / f"clip{class_id}.wav"
        write_clip(path, class_signal(class_id, 2.0, kind.sample_rate, np.random.default_rng(class_id)), kind)
        files.append(path)
    assert predict.main(["--model", str(exported), "--top-k", "3", "--json", *map(str, files)]) == 0
    ours = json.loads(capsys.readouterr().out)
    from trainable.data.audio import load_audio

    for path, result in zip(files, ours):
        theirs = clf(load_audio(path).numpy(), top_k=3)
        assert result["predictions"][0]["label"] == theirs[0]["label"]
        assert result["predictions"][0]["score"] == pytest.approx(theirs[0]["score"], abs=1e-4)
        assert len(result["predictions"]) == 3


def test_predict_handles_long_clips_and_folders(exported, tmp_path, capsys):
    long = tmp_path / "dir" / "long.wav"
    long.parent.mkdir()
    write_clip(long, class_signal(9, 12.0, 16000, np.random.default_rng(0)), WAV_KINDS[6])
    wave = torch.zeros(12 * 16000)
    wins = predict.windows(wave, 400)
    assert len(wins) > 2 and all(w.numel() == wins[0].numel() for w in wins)
    assert predict.main(["--model", str(exported), str(long.parent)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(long)) and line.count(",") == 2
    assert predict.main(["--model", str(exported), str(tmp_path / "missing.wav")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _fake_us8k(root: Path) -> None:
    rows = []
    for fold, n in US8K_FOLD_SIZES.items():
        (root / "audio" / f"fold{fold}").mkdir(parents=True)
        for i in range(n):
            cid = i % 10
            name = f"{fold}{i:04d}-{cid}-0-0.wav"
            (root / "audio" / f"fold{fold}" / name).touch()
            rows.append((name, fold * 10000 + i, 0.0, 1.0, 1, fold, cid, US8K_CLASSES[cid]))
    (root / "metadata").mkdir()
    pd.DataFrame(rows, columns=["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"]).to_csv(
        root / "metadata" / "UrbanSound8K.csv", index=False)


def test_verify_accepts_the_real_shape_and_reports_missing_and_extra(tmp_path, capsys):
    _fake_us8k(tmp_path)
    ok, lines = verify_dataset(tmp_path)
    assert ok, lines
    (tmp_path / "audio" / "fold4" / "40003-3-0-0.wav").unlink()
    (tmp_path / "audio" / "fold2" / "stray.wav").touch()
    assert data_main(["verify", "--data-root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "1 files missing" in out and "fold4/40003-3-0-0.wav" in out
    assert "1 files extra" in out and "fold2/stray.wav" in out


def test_verify_reports_a_generated_set_as_different(synth_root, capsys):
    assert data_main(["verify", "--data-root", str(synth_root)]) == 1
    out = capsys.readouterr().out
    assert "fold 1: 20 clips in the CSV, UrbanSound8K has 873" in out and "does NOT match" in out


def _name(requirement: str) -> str:
    return re.split(r"[<>=\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_name(r) for r in pip if not r.startswith("-e")}
    assert listed == wanted
    assert "python=3.11" in env["dependencies"]
