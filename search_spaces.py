"""Named search spaces: plain dicts keyed by TrainConfig field names.

A value ``{"grid_search": [...]}`` is a Ray Tune grid dimension (the same dict ``tune.grid_search`` returns);
any other value is fixed for every trial. Folds are a grid dimension too (``test_fold``); ``orchestrate.py
--folds`` replaces it (a space with fixed ``folds`` runs only its own test folds among them), ``--lrs``/``--batch-sizes``
replace the others.
"""

ALL_FOLDS = list(range(1, 11))

SPACES = {
    # The design card: 10 folds x lr {1e-5, 5e-5} x batch {8, 16} = 40 trials.
    "card": {
        "test_fold": {"grid_search": ALL_FOLDS},
        "lr": {"grid_search": [1e-5, 5e-5]},
        "batch_size": {"grid_search": [8, 16]},
    },
    # A check of the whole path in minutes before the long job: one test fold (training on the others), two short
    # epochs (checkpoint, resume point, best weights), then the reducer and the export. Not a result to quote.
    "smoke": {
        "folds": ALL_FOLDS,
        "test_fold": {"grid_search": [1]},
        "lr": {"grid_search": [5e-5]},
        "batch_size": {"grid_search": [8]},
        "epochs": 2,
        "max_steps_per_epoch": 50,
    },
    # The built-in demo's tiny AST learns at larger rates than AST-base.
    "demo": {
        "test_fold": {"grid_search": ALL_FOLDS},
        "lr": {"grid_search": [1e-3, 3e-4]},
        "batch_size": {"grid_search": [8]},
    },
    # The official AST fine-tuning recipe for ESC-50 from the AudioSet checkpoint (YuanGongND/ast: egs/esc50/run_esc.sh
    # and src/traintest.py; README "The official AST recipe" names the source of each value), on UrbanSound8K's ten
    # folds with --num-frames auto (the CLI default; 400 frames, as the recipe fits ESC-50's 5 s clips in 512).
    "ast-official": {
        "test_fold": {"grid_search": ALL_FOLDS},
        "lr": {"grid_search": [1e-5]},
        "batch_size": {"grid_search": [48]},
        "epochs": 25,
        "optimizer": "adam",
        "betas": [0.95, 0.999],
        "weight_decay": 5e-7,
        "lr_schedule": "step",
        "warmup_steps": 0,
        "lr_decay_start": 5,
        "lr_decay_step": 1,
        "lr_decay_factor": 0.85,
        "freqm": 24,
        "timem": 96,
        "mixup": 0.0,
    },
}
