"""The layout's promises: each folder of trainable/ imports only the floors under it (data -> fit -> run -> results,
all on store), the reducer reads experiments without torch or Ray, Ray lives in run/ only, and files and functions
stay small enough to read."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = sorted([*ROOT.glob("trainable/**/*.py"), ROOT / "orchestrate.py", ROOT / "predict.py", ROOT / "search_spaces.py"])
CODE = PRODUCT + sorted(ROOT.glob("benchmarks/*.py"))


def _heavy_modules(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted({m.split('.')[0] "
                          "for m in sys.modules} & {'torch', 'ray', 'torchaudio', 'transformers'})))"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_reducer_imports_neither_torch_nor_ray():
    assert _heavy_modules("import trainable.results.reduce, trainable.results.select, trainable.results.report") == []


def test_report_only_runs_without_torch_or_ray(tmp_path):
    from fakes import fake_experiment, fake_trial

    exp = fake_experiment(tmp_path / "exp")
    for fold in (1, 2, 3):
        fake_trial(exp, fold, [{"epoch": 1, "val_accuracy": 0.5, "test_accuracy": 0.25 * fold}])
    # exit status 1: the trials kept no checkpoint, so no model could be exported (the report says so)
    code = f"import orchestrate; assert orchestrate.main(['--report-only', {str(exp)!r}]) == 1"
    assert _heavy_modules(code) == []
    assert json.loads((exp / "summary.json").read_text())["mean"] == 0.5


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_ray_is_imported_in_run_only():
    with_ray = sorted(p.relative_to(ROOT).as_posix() for p in PRODUCT if "ray" in _imports(p))
    assert with_ray == ["trainable/run/cluster.py", "trainable/run/preflight.py", "trainable/run/resume.py",
                        "trainable/run/trial.py", "trainable/run/tuner.py"]


# What each floor of trainable/ may import from the package ("" is the package root: cli, config, errors), and which
# heavy libraries it must not import at all. The flow is data -> fit -> run -> results, all standing on store.
FLOORS = {
    "": {""},
    "store": {"", "store"},
    "data": {"", "data"},
    "fit": {"", "data", "store", "fit"},
    "run": {"", "data", "store", "fit", "run"},
    "results": {"", "data", "store", "results"},
}
BANNED = {"store": {"torch", "torchaudio", "transformers", "ray"}, "results": {"torch", "torchaudio", "transformers", "ray"},
          "data": {"ray"}, "fit": {"ray"}}
MOVED = {"train.py", "synth.py"}  # old `python -m` spellings at the root: entry points that point to the new ones


def _floor(module: str) -> str:
    """'trainable.fit.train' or 'trainable.fit' -> 'fit'; a module at the package root ('trainable.config') -> ''."""
    parts = module.split(".")
    return parts[1] if parts[1] in FLOORS else ""


def layer_violations(package: Path) -> list[str]:
    """Every import in ``package`` (a copy of trainable/) that breaks FLOORS or BANNED, as 'file: reason'."""
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if len(rel.parts) == 1 and rel.name in MOVED:
            continue
        here = ["trainable", *rel.parts[:-1]]
        floor = rel.parts[0] if len(rel.parts) > 1 else ""
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                targets = [node.module or ""]
            elif isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1]
                targets = [".".join(base + [node.module])] if node.module else [".".join(base + [a.name]) for a in node.names]
            for target in targets:
                top = target.split(".")[0]
                if top == "trainable" and target.count(".") >= 1:
                    wanted = _floor(target)
                    if wanted not in FLOORS.get(floor, set()):
                        found.append(f"{rel.as_posix()}: imports {target} ({floor or 'root'} may not import {wanted or 'root'})")
                elif top in BANNED.get(floor, set()):
                    found.append(f"{rel.as_posix()}: imports {top}")
    return found


def test_each_floor_imports_only_the_floors_under_it():
    assert layer_violations(ROOT / "trainable") == []


BROKEN = {
    "ray in results": ("results/stats.py", "import ray\n"),
    "torch in store": ("store/lock.py", "import torch\n"),
    "data imports run": ("data/features.py", "from ..run.plan import Plan\n"),
    "fit imports results": ("fit/oom.py", "from ..results import select\n"),
    "store imports fit": ("store/storage.py", "from ..fit.model import load_model\n"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_the_floor_rule_catches_a_broken_import(tmp_path, case):
    copy = tmp_path / "trainable"
    shutil.copytree(ROOT / "trainable", copy, ignore=shutil.ignore_patterns("__pycache__"))
    rel, line = BROKEN[case]
    (copy / rel).write_text((copy / rel).read_text() + "\n" + line)
    assert [v for v in layer_violations(copy) if v.startswith(rel)], case


def test_every_floor_says_what_it_holds_and_may_import():
    for floor in sorted(set(FLOORS) - {""}):
        doc = ast.get_docstring(ast.parse((ROOT / "trainable" / floor / "__init__.py").read_text()))
        assert doc and "import" in doc.lower() and len(doc.splitlines()) <= 3, floor


def test_files_and_functions_stay_small():
    long_files = [(p.name, n) for p in CODE if (n := len(p.read_text().splitlines())) > 400]
    long_functions = []
    for p in CODE:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long_functions.append((p.name, node.name, node.end_lineno - node.lineno + 1))
    assert long_files == [] and long_functions == []


def test_an_experiment_pickled_before_the_layout_move_still_unpickles():
    """Ray's tuner.pkl of an experiment started with the flat layout names trainable.trial, trainable.progress, ...;
    a resume restores it after aliasing the old names (protocol-0 pickles written by hand, as Ray's would name them)."""
    import pickle

    code = ("import pickle, sys; from trainable.run.tuner import alias_moved_modules; alias_moved_modules(); "
            "from trainable.run.trial import tune_trial; from trainable.run.progress import Progress; "
            "assert pickle.loads(b'ctrainable.trial\\ntune_trial\\n.') is tune_trial; "
            "assert pickle.loads(b'ctrainable.progress\\nProgress\\n.') is Progress; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip().endswith("ok"), out.stderr
    with pytest.raises(ModuleNotFoundError):  # without the aliases (this process never restored anything)
        pickle.loads(b"ctrainable.progress\nProgress\n.")
