"""The layout's promises: the reducer reads experiments without torch or Ray, Ray lives in two modules, and files and
functions stay small enough to read."""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = sorted([*ROOT.glob("trainable/*.py"), ROOT / "orchestrate.py", ROOT / "predict.py", ROOT / "search_spaces.py"])
CODE = PRODUCT + sorted(ROOT.glob("benchmarks/*.py"))


def _heavy_modules(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted({m.split('.')[0] "
                          "for m in sys.modules} & {'torch', 'ray', 'torchaudio', 'transformers'})))"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_reducer_imports_neither_torch_nor_ray():
    assert _heavy_modules("import trainable.reduce, trainable.select, trainable.report") == []


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


def test_ray_is_imported_in_two_modules_only():
    with_ray = sorted(p.relative_to(ROOT).as_posix() for p in PRODUCT if "ray" in _imports(p))
    assert with_ray == ["trainable/trial.py", "trainable/tuner.py"]


def test_files_and_functions_stay_small():
    long_files = [(p.name, n) for p in CODE if (n := len(p.read_text().splitlines())) > 400]
    long_functions = []
    for p in CODE:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long_functions.append((p.name, node.name, node.end_lineno - node.lineno + 1))
    assert long_files == [] and long_functions == []
