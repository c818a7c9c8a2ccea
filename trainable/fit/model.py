"""The AST model: load a pretrained checkpoint with a new head, fit its position grid to the frame count, export.

Knows nothing of training. Loads from a Hugging Face hub id (default: the AudioSet checkpoint) or a local folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from ..errors import AstCvError
from ..data.features import AUDIOSET_MEAN, AUDIOSET_STD, NUM_MEL_BINS, SAMPLE_RATE

log = logging.getLogger(__name__)

AST_MODEL_TYPE = "audio-spectrogram-transformer"



def check_model_source(name: str) -> str:
    """Return ``name`` if it looks usable: an existing AST checkpoint folder, or a hub id. Else raise AstCvError."""
    path = Path(name).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise AstCvError(
                f"Model folder {path} has no config.json, so it is not a Hugging Face checkpoint. Pass --model with "
                f"a folder written by save_pretrained() of an AST model, or a hub id such as "
                f"MIT/ast-finetuned-audioset-10-10-0.4593."
            )
        try:
            model_type = json.loads(cfg.read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AstCvError(f"{cfg} is not valid JSON ({exc}); the model folder is damaged.") from exc
        if model_type != AST_MODEL_TYPE:
            raise AstCvError(
                f"Model folder {path} holds a '{model_type}' checkpoint, not an Audio Spectrogram Transformer "
                f"('{AST_MODEL_TYPE}'). Pass --model with an AST checkpoint."
            )
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise AstCvError(f"Model folder {path} does not exist. Pass --model with an existing folder or a hub id.")
    return name


def resolve_model(name: str) -> str:
    """A local folder with the model's files: ``name`` itself, or the hub's copy in the Hugging Face cache, fetched
    here once (in the driver, before Ray starts) so that an unreachable hub or a mistyped id fails in seconds."""
    source = check_model_source(name)
    if Path(source).is_dir():
        return source
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(source, allow_patterns=["*.json", "*.safetensors"])
        if not list(Path(folder).glob("*.safetensors")):
            folder = snapshot_download(source, allow_patterns=["*.json", "*.bin"])
    except Exception as exc:  # offline, unknown repository, no access, timeout: all end the same way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AstCvError(
            f"Cannot get model {source!r} from the Hugging Face hub ({type(exc).__name__}: {first[:200]}). Check the "
            f"id for typos; offline, pass --model with a local folder holding the checkpoint (save_pretrained() output, "
            f"or the hub's files copied by hand), or set HF_HOME to a cache that has it."
        ) from None
    if not (Path(folder) / "config.json").is_file():
        raise AstCvError(f"Model {source!r} on the hub has no config.json: it is not a transformers checkpoint.")
    return folder


# ASTConfig's defaults for the fields that shape the parameters (a config.json written by transformers has them all).
_AST_SHAPE_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           patch_size=16, qkv_bias=True, frequency_stride=10, time_stride=10, num_mel_bins=128)


def count_parameters(folder: str, num_labels: int, num_frames: int) -> int:
    """Parameters of the model ``load_model`` builds from ``folder`` (new head, fitted position grid), from its
    config.json and the layer shapes of transformers' ASTForAudioClassification: no weights are read and transformers
    is not imported (seconds, in the driver). The tests hold it equal to the model built on the meta device."""
    c = {**_AST_SHAPE_DEFAULTS, **json.loads((Path(folder) / "config.json").read_text())}
    h, inter, patch = c["hidden_size"], c["intermediate_size"], c["patch_size"]
    inner = c["num_attention_heads"] * c.get("head_dim", h // c["num_attention_heads"])
    patches = ((c["num_mel_bins"] - patch) // c["frequency_stride"] + 1) * ((num_frames - patch) // c["time_stride"] + 1)
    embeddings = 2 * h + (patches + 2) * h + patch * patch * h + h  # cls and distillation tokens, positions, patches
    attention = 3 * (h * inner + (inner if c["qkv_bias"] else 0)) + inner * h + h
    layer = attention + (h * inter + inter) + (inter * h + h) + 2 * 2 * h  # + MLP, two layer norms
    head = 2 * h + (h * num_labels + num_labels if num_labels > 0 else 0)  # layer norm, dense
    return embeddings + c["num_hidden_layers"] * layer + 2 * h + head


def load_model(name: str, classes: Sequence[str], num_frames: int | None = None):
    """Load ``ASTForAudioClassification`` from a hub id or folder with a fresh head for ``classes``.

    The head is replaced (``num_labels=len(classes)``, ``ignore_mismatched_sizes=True``) and
    ``id2label``/``label2id`` come from the class names. If ``num_frames`` differs from the checkpoint's
    ``max_length``, the time axis of the position-embedding grid is center-cropped (or interpolated when
    longer), as the official AST code does, so the pretrained weights still apply.
    """
    from transformers import ASTForAudioClassification
    from transformers.utils import logging as hf_logging

    source = check_model_source(name)
    id2label = {i: c for i, c in enumerate(classes)}
    label2id = {c: i for i, c in id2label.items()}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized head" warning is expected here
    hf_logging.disable_progress_bar()
    try:
        model = ASTForAudioClassification.from_pretrained(
            source,
            num_labels=len(classes),
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=True,
            attn_implementation="sdpa",  # fused attention kernels (torch's scaled_dot_product_attention)
        )
    except OSError as exc:
        if Path(source).is_dir():
            raise AstCvError(f"Cannot load the AST checkpoint in {source}: {exc}") from exc
        raise AstCvError(
            f"Cannot load model {source!r} from the Hugging Face hub ({str(exc).splitlines()[0]}). Downloading "
            f"needs network access; offline, pass --model with a local folder holding the checkpoint "
            f"(save_pretrained() output, or the hub's files copied by hand), or set HF_HOME to a cache that has it."
        ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    if getattr(model.config, "model_type", None) != AST_MODEL_TYPE:
        raise AstCvError(f"{source} is not an Audio Spectrogram Transformer checkpoint.")
    if num_frames is not None and num_frames != model.config.max_length:
        fit_time_frames(model, num_frames)
    return model


def time_grid(config, num_frames: int) -> tuple[int, int]:
    """(frequency patches, time patches) of AST's patch grid for ``num_frames`` input frames."""
    f = (config.num_mel_bins - config.patch_size) // config.frequency_stride + 1
    t = (num_frames - config.patch_size) // config.time_stride + 1
    return f, t


def fit_time_frames(model, num_frames: int) -> None:
    """Resize the time axis of the position-embedding grid in place, for inputs of ``num_frames`` frames.

    Shorter: keep the center ``t`` columns (the official AST code's crop). Longer: linear interpolation.
    The two leading [CLS]/[DIST] embeddings are kept as they are.
    """
    config = model.config
    if num_frames < config.patch_size:
        raise AstCvError(f"num_frames must be at least the patch size {config.patch_size}, got {num_frames}.")
    emb = model.audio_spectrogram_transformer.embeddings
    f_dim, t_old = time_grid(config, config.max_length)
    _, t_new = time_grid(config, num_frames)
    pos = emb.position_embeddings.data  # [1, 2 + f*t, hidden]
    hidden = pos.shape[-1]
    if pos.shape[1] != 2 + f_dim * t_old:
        raise AstCvError(f"Unexpected position-embedding shape {tuple(pos.shape)} for max_length {config.max_length}.")
    grid = pos[:, 2:].reshape(1, f_dim, t_old, hidden)
    if t_new <= t_old:
        start = t_old // 2 - t_new // 2
        grid = grid[:, :, start : start + t_new]
    else:
        grid = torch.nn.functional.interpolate(
            grid.permute(0, 3, 1, 2), size=(f_dim, t_new), mode="bilinear", align_corners=False
        ).permute(0, 2, 3, 1)
    new = torch.cat([pos[:, :2], grid.reshape(1, f_dim * t_new, hidden)], dim=1).contiguous()
    emb.position_embeddings = torch.nn.Parameter(new)
    config.max_length = num_frames
    log.info("position grid resized from %d to %d time patches for %d frames", t_old, t_new, num_frames)


def feature_extractor(num_frames: int, mean: float = AUDIOSET_MEAN, std: float = AUDIOSET_STD):
    """An ASTFeatureExtractor computing exactly the features the model was trained on."""
    from transformers import ASTFeatureExtractor

    return ASTFeatureExtractor(
        feature_size=1,
        sampling_rate=SAMPLE_RATE,
        num_mel_bins=NUM_MEL_BINS,
        max_length=num_frames,
        mean=mean,
        std=std,
        do_normalize=True,
        return_attention_mask=False,
    )


def export_model(model, out_dir: str | Path, num_frames: int, state_dict=None) -> Path:
    """Write ``model`` (or ``state_dict`` under its config) in Hugging Face format with a matching feature extractor
    (pipeline-ready)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    feature_extractor(num_frames).save_pretrained(out)
    return out


def build_tiny_ast(out_dir: str | Path, num_labels: int = 527, max_length: int = 1024, seed: int = 0,
                   hidden_size: int = 32, num_heads: int = 2, num_layers: int = 2, dropout: float = 0.0) -> Path:
    """Save a tiny randomly initialized AST (same geometry as AST-base, 2 small layers) with a 527-class head.

    Stands in for the hub checkpoint in tests and the demo, where the hub is out of reach: loading it
    exercises the real head replacement and position-grid fitting.
    """
    from transformers import ASTConfig, ASTForAudioClassification

    torch.manual_seed(seed)
    config = ASTConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=2 * hidden_size,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        max_length=max_length,
        num_mel_bins=NUM_MEL_BINS,
        num_labels=num_labels,
    )
    model = ASTForAudioClassification(config)
    return export_model(model, out_dir, max_length)


def ast_base_config(max_length: int = 1024, num_labels: int = 10):
    """The architecture of MIT/ast-finetuned-audioset-10-10-0.4593 (AST-base, patch 16, stride 10)."""
    from transformers import ASTConfig

    return ASTConfig(max_length=max_length, num_labels=num_labels)  # ASTConfig's defaults are AST-base
