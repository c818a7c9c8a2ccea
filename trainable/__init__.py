"""ast-cv: fine-tune the Audio Spectrogram Transformer on UrbanSound8K with 10-fold cross-validation."""

__version__ = "0.1.0"
