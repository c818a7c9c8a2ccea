"""The data floor: UrbanSound8K's metadata and folds, WAV decoding, kaldi fbank features, the feature cache and the
generated demo dataset. Imports only the package root (config, errors, cli): never fit/, run/, store/ or results/."""
