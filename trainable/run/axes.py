"""Extra grid axes (``orchestrate.py --grid NAME=V1,V2``): any TrainConfig field, or a short switch alias, becomes a
dimension of the grid next to test fold, lr and batch size, so a recipe option is ablated with the same nested
selection. The grid (and the manifest) records each axis under its NAME with typed values; trials get them through
Ray's config, an alias expanded into its fields by ``expand_axes`` just before the TrainConfig is built.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, get_type_hints

from ..config import TrainConfig, _coerce
from ..errors import AstCvError
from ..store.experiment import axis_text

SPECAUG_ON = {"freqm": 24, "timem": 96}  # the official AST recipe's masks (search_spaces.py ast-official)
# Switch aliases: NAME -> what each value sets. specaug=off,on: SpecAugment off (freqm/timem 0) vs on (the space's own
# freqm/timem where it sets them, else the official 24/96).
ALIASES = {"specaug": ("off", "on")}
ALIAS_HELP = "specaug=off,on (freqm/timem 0 vs the space's, else the official 24/96)"
# Fields that are the grid's own (test_fold, lr, batch_size have their flags), the experiment's layout, or resources.
NOT_AXES = ("test_fold", "lr", "batch_size", "val_fold", "folds", "skip_clips", "data_root", "feature_cache",
            "num_workers", "device", "torch_threads")
_TRUE, _FALSE = ("true", "on", "yes", "1"), ("false", "off", "no", "0")


def axis_fields() -> list[str]:
    """TrainConfig fields that may be a grid axis: plain-valued (no tuples), not the grid's or the machine's own."""
    hints = get_type_hints(TrainConfig)
    return sorted(k for k, h in hints.items() if k not in NOT_AXES and "tuple" not in str(h))


def _value(name: str, text: str) -> Any:
    if name in ALIASES:
        if text not in ALIASES[name]:
            raise AstCvError(f"--grid {name}: value {text!r} is not one of {', '.join(ALIASES[name])}.")
        return text
    hint = get_type_hints(TrainConfig)[name]
    if hint is bool:
        if text.lower() not in (*_TRUE, *_FALSE):
            raise AstCvError(f"--grid {name}: value {text!r} is not a switch (true/false, on/off).")
        return text.lower() in _TRUE
    try:
        return _coerce(name, text, hint)
    except AstCvError:
        raise AstCvError(f"--grid {name}: value {text!r} is not a {getattr(hint, '__name__', hint)}.") from None


def parse_axis(spec: str) -> tuple[str, list]:
    """``NAME=V1,V2`` -> (NAME, typed values), refused in one line naming what is valid."""
    name, sep, values = spec.partition("=")
    name = name.strip()
    if not sep or not name or not values.strip():
        raise AstCvError(f"--grid {spec!r}: write NAME=V1,V2 (e.g. --grid specaug=off,on or --grid mixup=0,0.5).")
    if name not in ALIASES and name not in axis_fields():
        raise AstCvError(f"--grid {name!r} is not a setting that can be a grid axis; valid: {', '.join(ALIASES)} (alias) "
                         f"and {', '.join(axis_fields())} (use --lrs, --batch-sizes, --test-folds for those).")
    out = [_value(name, t.strip()) for t in values.split(",") if t.strip()]
    texts = [axis_text(v) for v in out]
    if len(set(texts)) != len(texts):
        raise AstCvError(f"--grid {name}: a value is given twice ({', '.join(texts)}).")
    bad = [t for t in texts if not t.replace(".", "").replace("+", "").replace("-", "").isalnum()]
    if bad:
        raise AstCvError(f"--grid {name}: value {bad[0]!r} cannot be part of a trial folder name (letters, digits, . + -).")
    return name, out


def parse_axes(specs: Sequence[str] | None) -> dict[str, list]:
    """Every ``--grid`` flag, in the order given; an axis given twice is refused."""
    axes: dict[str, list] = {}
    for spec in specs or ():
        name, values = parse_axis(spec)
        if name in axes:
            raise AstCvError(f"--grid {name} is given twice; give its values once: --grid {name}=V1,V2.")
        axes[name] = values
    both = sorted({"freqm", "timem"} & set(axes)) if "specaug" in axes else []
    if both:
        raise AstCvError(f"--grid specaug sets freqm and timem itself: give either specaug or {both[0]}, not both.")
    return axes


def expand_axes(values: Mapping[str, Any]) -> dict[str, Any]:
    """Config values with each alias axis replaced by the fields it sets (plain field axes are config keys already)."""
    out = dict(values)
    if "specaug" in out:
        on = out.pop("specaug") == "on"
        for key, official in SPECAUG_ON.items():
            out[key] = (out.get(key) or official) if on else 0
    return out


def axis_overrides(extra: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields a combination of axis values sets, over ``base`` (for the refit of the chosen config)."""
    expanded = expand_axes({**base, **extra})
    return {k: v for k, v in expanded.items() if k in extra or base.get(k) != v}


def grid_overrides(extra: Mapping[str, str] | None, grid: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields of a config named by its axis values' text (a summary's "extra"), typed from the grid."""
    typed = {}
    for name, text in (extra or {}).items():
        typed[name] = next(v for v in grid[name] if axis_text(v) == text)
    return axis_overrides(typed, base)
