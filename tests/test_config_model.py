import argparse
import json

import pytest
import torch
from transformers import ASTForAudioClassification

from trainable.config import TrainConfig, add_config_arguments, config_fields, config_from_args
from trainable.errors import AstCvError
from trainable.fit.model import check_model_source, fit_time_frames, load_model, time_grid

CLASSES = [f"c{i}" for i in range(10)]


def test_from_dict_round_trip_and_coercion():
    c = TrainConfig.from_dict({"lr": "1e-5", "batch_size": 16.0, "folds": [1, 2, 3], "test_fold": 2, "data_root": "/d"})
    assert c.lr == 1e-5 and c.batch_size == 16 and c.folds == (1, 2, 3)
    assert TrainConfig.from_dict(json.loads(c.to_json())) == c


@pytest.mark.parametrize(
    "values, message",
    [
        ({"learning_rate": 1e-5}, "Unknown config key"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": -1e-5}, "lr must be > 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"batch_size": 2.5}, "expects int"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"folds": [1, 2, 3], "test_fold": 5}, "test_fold 5 is not among"),
        ({"folds": [1, 2]}, "at least 3 distinct folds"),
        ({"folds": [0, 1, 2]}, "within 1..10"),
        ({"val_fold": 1}, "val_fold 1 must be one of"),
        ({"amp": "fp8"}, "amp must be one of"),
        ({"num_frames": 8}, "num_frames must be >= 16"),
        ({"folds": "1 2 3"}, "expects tuple"),
    ],
)
def test_bad_config_values_are_clear_errors(values, message):
    with pytest.raises(AstCvError, match=message):
        TrainConfig.from_dict(values)


def test_cli_has_a_flag_with_help_for_every_field():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = parser.format_help()
    for f in config_fields():
        assert "--" + f.name.replace("_", "-") in text
    assert parser.parse_args([]).num_frames == "auto"  # resolved from the clips by each command line
    args = parser.parse_args(["--data-root", "/x", "--folds", "1", "2", "3", "--test-fold", "3", "--lr", "1e-5",
                              "--num-frames", "400"])
    c = config_from_args(args)
    assert c.folds == (1, 2, 3) and c.test_fold == 3 and c.lr == 1e-5 and c.data_root == "/x"


def test_head_is_replaced_and_labels_set(tiny_ast_1024):
    model = load_model(str(tiny_ast_1024), CLASSES)
    assert model.classifier.dense.out_features == 10
    assert model.config.id2label[3] == "c3" and model.config.label2id["c9"] == 9
    original = ASTForAudioClassification.from_pretrained(tiny_ast_1024)
    assert original.classifier.dense.out_features == 527
    # The body is the pretrained one, only the head is new.
    torch.testing.assert_close(
        model.audio_spectrogram_transformer.embeddings.patch_embeddings.projection.weight,
        original.audio_spectrogram_transformer.embeddings.patch_embeddings.projection.weight,
    )


def test_position_grid_is_center_cropped_for_shorter_inputs(tiny_ast_1024):
    original = ASTForAudioClassification.from_pretrained(tiny_ast_1024)
    f, t_old = time_grid(original.config, 1024)
    model = load_model(str(tiny_ast_1024), CLASSES, num_frames=400)
    _, t_new = time_grid(model.config, 400)
    assert (f, t_old, t_new) == (12, 101, 39)
    pos_old = original.audio_spectrogram_transformer.embeddings.position_embeddings
    pos_new = model.audio_spectrogram_transformer.embeddings.position_embeddings
    assert pos_new.shape == (1, 2 + f * t_new, pos_old.shape[-1])
    grid_old = pos_old[0, 2:].reshape(f, t_old, -1)
    start = t_old // 2 - t_new // 2
    torch.testing.assert_close(pos_new[0, 2:].reshape(f, t_new, -1), grid_old[:, start : start + t_new])
    torch.testing.assert_close(pos_new[0, :2], pos_old[0, :2])
    assert model.config.max_length == 400
    logits = model(input_values=torch.randn(2, 400, 128)).logits
    assert logits.shape == (2, 10)


def test_same_frame_count_leaves_the_grid_unchanged(tiny_ast_1024):
    original = ASTForAudioClassification.from_pretrained(tiny_ast_1024)
    model = load_model(str(tiny_ast_1024), CLASSES, num_frames=1024)
    torch.testing.assert_close(
        model.audio_spectrogram_transformer.embeddings.position_embeddings,
        original.audio_spectrogram_transformer.embeddings.position_embeddings,
    )


def test_longer_inputs_interpolate_the_grid(tiny_ast_1024):
    model = ASTForAudioClassification.from_pretrained(tiny_ast_1024)
    fit_time_frames(model, 1200)
    assert model(input_values=torch.randn(1, 1200, 128)).logits.shape == (1, 527)


def test_non_ast_folders_and_unreachable_hub_are_clear_errors(tmp_path):
    with pytest.raises(AstCvError, match="no config.json"):
        check_model_source(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(AstCvError, match="'bert' checkpoint, not an Audio Spectrogram Transformer"):
        load_model(str(tmp_path), CLASSES)
    with pytest.raises(AstCvError, match="does not exist"):
        check_model_source(str(tmp_path / "missing"))
    with pytest.raises(AstCvError, match="needs network access"):
        load_model("MIT/no-such-ast-checkpoint-for-tests", CLASSES)


@pytest.mark.parametrize("shape, num_labels, num_frames", [
    ({}, 10, 400),  # AST-base (ASTConfig's defaults), as the grid trains it
    ({}, 527, 1024),  # the AudioSet checkpoint as published
    (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_length=1024), 10, 400),
    (dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, intermediate_size=96, qkv_bias=False,
          frequency_stride=16, time_stride=12, patch_size=8, num_mel_bins=64), 3, 512),
])
def test_parameter_count_equals_the_model_built_on_the_meta_device(tmp_path, shape, num_labels, num_frames):
    from transformers import ASTConfig

    from trainable.fit.model import count_parameters

    ASTConfig(**shape).save_pretrained(tmp_path)  # the checkpoint's own max_length and head do not count
    config = ASTConfig(**{**shape, "max_length": num_frames, "num_labels": num_labels})
    with torch.device("meta"):
        model = ASTForAudioClassification(config)
    assert count_parameters(str(tmp_path), num_labels, num_frames) == sum(p.numel() for p in model.parameters())
