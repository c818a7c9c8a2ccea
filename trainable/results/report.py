"""report.md: the summary as Markdown a researcher can paste, with the uncertainty of every number it quotes."""

from __future__ import annotations

from typing import Any

from ..config import recipe_summary
from ..store.experiment import extra_axes, format_lr
from .select import ALPHA, extra_label


def _axes(s: dict[str, Any]) -> list[str]:
    """The grid's extra axes (--grid), each a column of the tables."""
    return list(extra_axes(s.get("grid") or {}))


def _heads(s: dict[str, Any]) -> str:
    return "".join(f" {a} |" for a in _axes(s))


def _cells(s: dict[str, Any], row: dict[str, Any]) -> str:
    return "".join(f" {(row.get('extra') or {}).get(a, '–')} |" for a in _axes(s))


def fmt(mean: float | None, std: float | None) -> str:
    """Accuracy as percent, mean ± std."""
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * mean:.2f}"


def fmt_ci(ci: list[float] | None, corrected: bool = True) -> str:
    """An accuracy interval as "95 % CI 21.30 to 34.80 %" (console and report), kept within [0, 100] % and saying which
    bound was clipped; ``corrected``: the t-interval corrected for overlapping training sets (Nadeau & Bengio)."""
    if not ci:
        return "95 % CI n/a (one fold)"
    lo, hi = 100 * ci[0], 100 * ci[1]
    clipped = [f"the lower bound ({lo:.2f} %) clipped to 0 %"] if lo < 0 else []
    clipped += [f"the upper bound ({hi:.2f} %) clipped to 100 %"] if hi > 100 else []
    notes = (["corrected"] if corrected else []) + (["; ".join(clipped)] if clipped else [])
    return f"95 % CI {max(lo, 0.0):.2f} to {min(hi, 100.0):.2f} %" + "".join(f", {n}" for n in notes)


def comparison_verdict(s: dict[str, Any]) -> str | None:
    """What the comparisons of the other configs with the chosen one say, in one sentence (console and report)."""
    comps = s.get("comparisons") or []
    if not comps or not s.get("best_config"):
        return None
    tested = [c for c in comps if c["p_value"] is not None]
    if not tested:
        return "With fewer than two common folds no config can be compared with the chosen one."
    different = [c for c in tested if c["p_value"] < ALPHA]
    if different:
        return (f"Significantly different from the chosen config (p < {ALPHA}): "
                + ", ".join(f"lr {format_lr(c['lr'])}/batch {c['batch_size']}{extra_label(c.get('extra'))} ({100 * c['mean_difference']:+.2f} points)"
                            for c in different) + ".")
    k = min(c["folds"] for c in tested)
    caution = (f"low power: with {k} folds a difference of several points can go undetected" if k < 10 else
               f"p ≥ {ALPHA}, which is not evidence that they are equal")
    return f"No significant difference between the chosen config and the others on these {k} folds ({caution})."


def _headline(s: dict[str, Any]) -> list[str]:
    n = len(s["per_fold"])
    plain = s.get("ci95_plain")
    plain_text = f"; the plain t-interval, too narrow here: {fmt_ci(plain, corrected=False)}" if plain else ""
    lines = [f"**Nested cross-validation test accuracy: {fmt(s['mean'], s['std'])} %** ({fmt_ci(s.get('ci95'))}; "
             f"mean ± sample std over {n} fold{'s' if n != 1 else ''}; the interval is the t-interval corrected for "
             f"the folds' overlapping training sets (Nadeau & Bengio 2003){plain_text}; on each fold the config and "
             f"epoch were chosen on that fold's validation fold, never on its test fold).", ""]
    if not s["complete"]:
        lines += [f"⚠ Partial experiment: {s['trials_finished']} of {s['trials_expected']} trials finished. Missing or "
                  f"unfinished: " + ", ".join(f"{u['trial']} ({u['epochs_done']} epochs)" for u in s["unfinished"]), ""]
    if s.get("skipped_clips"):
        lines += [f"⚠ {len(s['skipped_clips'])} clip(s) could not be read and were left out of every trial: "
                  + "; ".join(f"{c} ({r})" for c, r in sorted(s["skipped_clips"].items())), ""]
    if s.get("fsids_in_several_folds"):
        shared = s["fsids_in_several_folds"]
        lines += [f"⚠ {len(shared)} recording(s) (fsID) have clips in several folds, as in the official metadata; the "
                  f"official folds are kept so results stay comparable with published ones: "
                  + "; ".join(f"fsID {k} in folds {', '.join(map(str, v))}" for k, v in sorted(shared.items())), ""]
    return lines


def _tables(s: dict[str, Any]) -> list[str]:
    extra = "---|" * len(_axes(s))
    lines = ["## Per fold (nested selection)", "", f"| test fold | lr | batch |{_heads(s)} epoch | val acc % | test acc % |",
             "|---|---|---|" + extra + "---|---|---|"]
    for p in s["per_fold"]:
        lines.append(f"| {p['fold']} | {format_lr(p['lr'])} | {p['batch_size']} |{_cells(s, p)} {p['epoch']} | {100 * p['val_accuracy']:.2f} | "
                     f"{100 * p['test_accuracy']:.2f} |")
    folds = sorted({int(f) for c in s["configs"] for f in c["test_accuracy"]})
    lines += ["", "## Every config (test accuracy % at each fold's best-validation epoch)", "",
              f"| lr | batch |{_heads(s)} " + " | ".join(f"fold {f}" for f in folds) + " | mean ± std | mean val % |",
              "|---|---|" + extra + "---|" * len(folds) + "---|---|"]
    for c in s["configs"]:
        cells = [f"{100 * c['test_accuracy'][str(f)]:.2f}" if str(f) in c["test_accuracy"] else "–" for f in folds]
        mv = f"{100 * c['mean_val_accuracy']:.2f}" if c["mean_val_accuracy"] is not None else "n/a"
        lines.append(f"| {format_lr(c['lr'])} | {c['batch_size']} |{_cells(s, c)} " + " | ".join(cells) + f" | {fmt(c['mean'], c['std'])} | {mv} |")
    return lines + [""]


def _choice(s: dict[str, Any]) -> list[str]:
    lines = []
    if s["best_config"]:
        b = s["best_config"]
        lines.append(f"Best config by mean **validation** accuracy: lr {format_lr(b['lr'])}, batch {b['batch_size']}"
                     f"{extra_label(b.get('extra'))} (its mean test "
                     f"accuracy, {fmt(b['mean'], b['std'])} %, is mildly optimistic: each validation fold is another "
                     f"round's test fold; quote the nested number above).")
        model = s.get("best_model") or {}
        if s.get("best_model_dir"):
            lines.append(f"Exported model: `{s['best_model_dir']}` = {model.get('trial')}, epoch {model.get('epoch')}.")
        elif s.get("export_problem"):
            lines.append(f"⚠ No model was exported: {s['export_problem']}.")
    if s["optimistic"]:
        o = s["optimistic"]
        lines.append(f"Optimistic (config chosen on mean **test** accuracy, as many papers do; biased upwards): "
                     f"lr {format_lr(o['lr'])}, batch {o['batch_size']}{extra_label(o.get('extra'))}: {fmt(o['mean'], o['std'])} %.")
    return lines


def _comparisons(s: dict[str, Any]) -> list[str]:
    comps = s.get("comparisons") or []
    if not comps or not s["best_config"]:
        return []
    b = s["best_config"]
    lines = ["", f"## Configs compared with the best one (lr {format_lr(b['lr'])}, batch {b['batch_size']}"
                 f"{extra_label(b.get('extra'))})", "",
             "Paired over folds with the corrected resampled t-test (Nadeau & Bengio 2003: the variance of the per-fold "
             "differences × (1/k + n_test/n_train), since the folds' training sets overlap); two-sided.", "",
             f"| lr | batch |{_heads(s)} folds | mean difference (points) | t | p |",
             "|---|---|" + "---|" * len(_axes(s)) + "---|---|---|---|"]
    for c in comps:
        t = "n/a" if c["t"] is None else f"{c['t']:.2f}"
        p = "n/a" if c["p_value"] is None else f"{c['p_value']:.3f}"
        diff = "n/a" if c["mean_difference"] is None else f"{100 * c['mean_difference']:+.2f}"
        lines.append(f"| {format_lr(c['lr'])} | {c['batch_size']} |{_cells(s, c)} {c['folds']} | {diff} | {t} | p = {p} |")
    return lines + ["", f"**{comparison_verdict(s)}**"]


def _refit(s: dict[str, Any]) -> list[str]:
    r = s.get("refit")
    if not r:
        return []
    return ["", "## Final model (refit on all folds)", "",
            f"`{s.get('final_model_dir')}`: trained on every fold in use ({', '.join(map(str, r['folds']))}) with lr "
            f"{format_lr(r['lr'])}, batch {r['batch_size']}{extra_label(r.get('extra'))}, for {r['epochs']} epochs (the median best epoch of that config). It "
            f"saw every clip, so it has no test accuracy of its own: the nested cross-validation figure above is the "
            f"estimate of how such a model does on unseen data."]


def _details(s: dict[str, Any]) -> list[str]:
    lines = []
    if s.get("plots"):
        from .plots import CAPTIONS

        titles = {"fold_accuracy": "Test accuracy per fold and config", "learning_curves": "Learning curves",
                  "confusion_matrix": "Confusion matrix", "per_class_accuracy": "Per-class accuracy"}
        lines += ["", "## Figures", "", "Each figure is also in the same folder as vector graphics (`.svg`, `.pdf`), "
                  "sized for one column of a paper.", ""]
        for key, rel in s["plots"].items():
            title = titles.get(key, key)
            lines += [f"### {title}", "", f"![{title}]({rel})", "", f"*{CAPTIONS.get(key, title)}*", ""]
    if s["per_class_accuracy"]:
        lines += ["", "## Per class (nested selection, summed over folds)", "", "| class | accuracy % |", "|---|---|"]
        for name, acc in s["per_class_accuracy"].items():
            lines.append(f"| {name} | {'n/a' if acc is None else f'{100 * acc:.2f}'} |")
    if s["confusion_matrix"]:
        names = s["classes"] or [str(i) for i in range(len(s["confusion_matrix"]))]
        lines += ["", "## Confusion matrix (rows: true class, columns: predicted; summed over folds)", "",
                  "| true \\ predicted | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for name, row in zip(names, s["confusion_matrix"]):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    v = s.get("versions") or {}
    lines += ["", "## Reproduce", "", f"- command: `{' '.join(s['command'] or [])}`",
              f"- seed {s['seed']}, commit {s['git_commit']}, " + ", ".join(f"{k} {val}" for k, val in v.items()), ""]
    return lines


RECIPE_KEYS = ("epochs", "optimizer", "betas", "weight_decay", "lr_schedule", "warmup_steps", "lr_decay_start",
               "lr_decay_step", "lr_decay_factor", "freqm", "timem", "mixup", "wa_start", "wa_end", "num_frames")


def _recipe(s: dict[str, Any]) -> list[str]:
    """The training recipe every trial shared (the grid's lr and batch size are in the tables above)."""
    config = s.get("config") or {}
    rows = [(k, config[k]) for k in RECIPE_KEYS if k in config]
    if not rows:
        return []
    lines = ["## Training recipe", "", recipe_summary(config) + ".", ""]
    axes = extra_axes(s.get("grid") or {})
    if axes:
        lines += ["Grid axes beyond lr and batch size (`--grid`; each value is its own config in the tables above, and "
                  "the table below holds the other settings): " + "; ".join(
                      f"{k} {', '.join(str(v) for v in vals)}" for k, vals in axes.items()) + ".", ""]
    lines += ["| setting | value |", "|---|---|"]
    lines += [f"| {k} | {', '.join(map(str, v)) if isinstance(v, list) else v} |" for k, v in rows]
    return lines + [""]


def render_report(s: dict[str, Any]) -> str:
    """The Markdown report: headline with its interval, per-fold picks, every config, the recipe, comparisons, classes."""
    return "\n".join(["# ast-cv cross-validation report", ""] + _headline(s) + _tables(s) + _recipe(s) + _choice(s)
                     + _comparisons(s) + _refit(s) + _details(s))
