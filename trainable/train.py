"""Moved: ``python -m trainable.train`` is now ``python -m trainable.fit`` (the code lives in ``trainable/fit/``)."""

if __name__ == "__main__":
    from .cli import run_moved
    from .fit.local import main

    raise SystemExit(run_moved("trainable.train", "trainable.fit", main))
