"""One fold with one config, without Ray: the training loop, its steps, out-of-memory fallback, checkpoints and the
model. The code path every trial runs. May import data/ and store/, never run/ or results/; never Ray."""
