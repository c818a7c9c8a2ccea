"""Moved: ``python -m trainable.synth`` is now ``python -m trainable.data.synth``."""

if __name__ == "__main__":
    from .cli import run_moved
    from .data.synth import main

    raise SystemExit(run_moved("trainable.synth", "trainable.data.synth", main))
