"""One fold with one config, without Ray: the training loop, its steps, out-of-memory fallback, checkpoints, the
model and the official AST recipe's options (augment.py: SpecAugment, mixup; recipe.py: optimizer, lr schedule,
weight averaging). The code path every trial runs. May import data/ and store/, never run/ or results/; never Ray."""
