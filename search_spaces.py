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
}
