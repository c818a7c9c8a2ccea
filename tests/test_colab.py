"""The Colab notebook runs top to bottom as written: its code cells are executed in order by IPython (as a kernel
runs them) against the demo, with only the Drive mount and the %tensorboard magic stubbed, and the settings cell's
values set as a user sets them."""

import base64
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "colab.ipynb"

RUNNER = r'''
import json, os, signal, sys, threading, time
from IPython.core.displaypub import DisplayPublisher
from IPython.core.interactiveshell import InteractiveShell

nb, settings, steps = (json.load(open(a)) for a in sys.argv[1:4])
shell = InteractiveShell.instance()
shell.run_line_magic("load_ext", "tensorboard")
opened, shown, report = [], [], {"steps": []}
shell.register_magic_function(lambda line: opened.append(shell.var_expand(line)), magic_kind="line",
                              magic_name="tensorboard")  # stub: a TensorBoard server is not started


class Publisher(DisplayPublisher):  # what display() shows, as a notebook front end receives it
    def publish(self, data, metadata=None, **kwargs):
        shown.append(data)


shell.display_pub = Publisher(shell=shell)


def processes():
    """(pid, parent pid, process group) of every live process (zombies aside)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            state, ppid, pgid = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if state != "Z":
            out.append((int(pid), int(ppid), int(pgid)))
    return out


def groups_of_children():
    return sorted({g for _, ppid, g in processes() if ppid == os.getpid()})


class Watcher:  # the cell's output as it comes: Stop pressed (the kernel gets SIGINT) once it shows ``stop_on``
    def __init__(self, stream, step, waiting):
        self.stream, self.step, self.waiting, self.trigger, self.seen = stream, step, waiting, step.get("stop_on"), ""

    def write(self, text):
        self.stream.write(text)
        self.seen = (self.seen + text)[-2000:]
        if "Waiting for the lock" in self.seen:
            self.waiting.set()
        if self.trigger and self.trigger in self.seen:
            self.trigger = None
            self.step["stopped_groups"] = groups_of_children()
            os.kill(os.getpid(), signal.SIGINT)
        return len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def lost_vm(path, waiting):
    """A VM holding the lock, refreshing it, until the orchestrator is seen waiting for it: then it disconnects."""
    lock = {"pid": 4242, "host": "lost-colab-vm", "started": "earlier", "command": ["python", "orchestrate.py"]}
    while True:
        open(path + ".tmp", "w").write(json.dumps({**lock, "refreshed": time.time()}))
        os.replace(path + ".tmp", path)
        if waiting.wait(0.3):
            return


code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
code[0] += "\n" + "\n".join(f"{k} = {v!r}" for k, v in settings.items())  # the settings cell, as the user fills it in
for step in steps:
    waiting = threading.Event()
    if step.get("lost_lock"):  # the VM that held the lock disconnects once the cell waits for it
        threading.Thread(target=lost_vm, args=(step["lost_lock"], waiting), daemon=True).start()
    print(f"=== cell {step['cell']}", flush=True)
    sys.stdout = Watcher(sys.__stdout__, step, waiting)
    result = shell.run_cell(code[step["cell"]])
    sys.stdout = sys.__stdout__
    waiting.set()
    step["error"] = type(result.error_in_exec).__name__ if result.error_in_exec else None
    report["steps"].append(step)
    if step.get("stop_on"):  # right after the cell: nothing of the run's process group may be left
        step["groups_alive"] = sorted({g for _, _, g in processes()} & set(step.get("stopped_groups", [])))
    elif not result.success:
        print(f"=== cell {step['cell']} FAILED", flush=True)
        break
report["tensorboard"], report["shown"] = opened, shown
json.dump(report, open(sys.argv[4], "w"))
'''

DRIVE_STUB = "def mount(path, **kwargs):\n    print(f'(stub) Drive mounted at {path}')\n"


def test_notebook_is_valid_checks_every_step_and_opens_tensorboard_before_training():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert "YOUR-ACCOUNT" not in NOTEBOOK.read_text()
    assert all("!" not in line.lstrip()[:1] for c in code for line in c.splitlines())  # no unchecked shell steps
    tensorboard = next(i for i, c in enumerate(code) if "%tensorboard" in c)
    first_run = next(i for i, c in enumerate(code) if "run(f'python orchestrate.py" in c)
    assert tensorboard < first_run  # TensorBoard opens before training


def _source_zip(dest: Path) -> Path:
    """The working tree as a source archive, as a user would put one on Drive (CODE_ZIP)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    with zipfile.ZipFile(dest, "w") as z:
        for name in files:
            if (ROOT / name).is_file():
                z.write(ROOT / name, f"ast-cv-main/{name}")
    return dest


def _index_reachable(tmp_path) -> bool:
    probe = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                            "-d", str(tmp_path / "probe"), "setuptools"], capture_output=True, text=True, timeout=120)
    return probe.returncode == 0


def _cell_outputs(out: str) -> list[tuple[int, str]]:
    """(code cell index, its output) for each cell run, in order."""
    parts = re.split(r"^=== cell (\d+)\n", out, flags=re.M)
    return [(int(parts[i]), parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_on_the_demo_and_recovers_from_a_stop_and_a_disconnect(demo_assets, tmp_path):
    """Run all; the grid cell is stopped after its first epoch (the run's whole process group must be gone at once),
    then, with a disconnected VM's fresh lock in the experiment, run again: it waits for the lock with a countdown and
    continues; the resume cell finds the experiment complete (no Ray); the smoke run keeps its own settings though
    EXTRA says otherwise; the report is shown once with its images embedded; the predict cell shows true vs predicted."""
    if not _index_reachable(tmp_path):
        pytest.skip("pip install -e . needs the package index (for its build backend)")
    data, model = demo_assets
    stub = tmp_path / "stub" / "google" / "colab"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    (stub / "drive.py").write_text(DRIVE_STUB)
    runs = tmp_path / "runs"
    settings = {"CODE_ZIP": str(_source_zip(tmp_path / "ast-cv.zip")), "CODE": str(tmp_path / "code"),
                "DATA": str(data), "RUNS": str(runs), "NAME": "nb", "MODEL": str(model), "GPUS": 0, "EXPECT_US8K": False,
                "EXTRA": "--folds 1 2 3 --test-folds 1 --lrs 1e-3 --batch-sizes 8 --epochs 2 --num-workers 0",
                "SMOKE_EXTRA": "--folds 1 2 3 --num-workers 0"}
    grid, resume = 6, 7
    steps = [{"cell": i} for i in range(grid)] + [
        {"cell": grid, "stop_on": " epoch 1/2: "},  # Stop pressed once the first epoch is reported
        {"cell": grid, "lost_lock": str(runs / "nb" / ".astcv.lock")},  # "run all" soon after a disconnect
        {"cell": resume}, {"cell": 8}, {"cell": 9}]
    for name, value in (("settings", settings), ("steps", steps)):
        (tmp_path / f"{name}.json").write_text(json.dumps(value))
    (tmp_path / "runner.py").write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "stub"), "PIP_PREFIX": str(tmp_path / "prefix"),
           "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "ASTCV_LOCK_STALE_S": "3"}
    run = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(NOTEBOOK), *(str(tmp_path / f"{n}.json")
                          for n in ("settings", "steps")), str(tmp_path / "report.json")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    (tmp_path / "notebook.log").write_text(out)
    assert run.returncode == 0 and "FAILED" not in out, out[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert "(stub) Drive mounted at /content/drive" in out
    assert report["tensorboard"] == [f"--logdir {runs}"]
    cells = _cell_outputs(run.stdout)
    stopped, again, resumed = (text for i, text in cells if i in (grid, resume))
    stop = report["steps"][grid]
    assert stop["error"] == "KeyboardInterrupt" and stop["stopped_groups"] and stop["groups_alive"] == [], stop
    assert "Stopped." in stopped
    assert "Waiting for the lock" in again and "giving up in" in again, again[-3000:]
    # continued: resumed, or complete already when the stopped run had checkpointed its last epoch before the Stop
    assert "taking over the lock" in again and "lost-colab-vm" in again, again[-3000:]
    assert "Resuming" in again or "is complete (1 of 1 trials finished)" in again, again[-3000:]
    assert "is complete (1 of 1 trials finished)" in resumed
    assert not any(s in resumed for s in ("Disk:", "Running ", "Resuming")), resumed  # no Ray started
    smoke = json.loads((runs / "smoke" / "astcv_run.json").read_text())
    assert smoke["grid"]["lr"] == [5e-5] and smoke["base_config"]["max_steps_per_epoch"] == 50  # not EXTRA's
    assert (runs / "smoke" / "best_model").is_dir() and (runs / "nb" / "best_model").is_dir()
    _check_report_shown(report["shown"], runs / "nb")
    predicted = [line for line in run.stdout.splitlines() if re.match(r"(right|WRONG): .*true .*predicted", line)]
    assert "clips of different classes from its test fold 1" in out and len(predicted) >= 2
    assert len({line.split("true ")[1].split(",")[0] for line in predicted}) == len(predicted)  # different classes
    assert "BrokenPipe" not in out and out.count("Traceback") == stopped.count("Traceback") <= 1  # the Stop's own


def _check_report_shown(shown: list[dict], exp: Path) -> None:
    """report.md shown once, as Markdown, each figure embedded as a PNG (links relative to exp/ break in a notebook)."""
    markdown = [d["text/markdown"] for d in shown if "text/markdown" in d]
    assert len(markdown) == 1 and not [d for d in shown if "image/png" in d]
    assert "Nested cross-validation test accuracy" in markdown[0]
    images = re.findall(r"!\[[^\]]*\]\(([^)]*)\)", markdown[0])
    plots = json.loads((exp / "summary.json").read_text())["plots"]
    assert len(images) == len(plots) >= 3
    for link in images:
        assert link.startswith("data:image/png;base64,")
        assert base64.b64decode(link.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- the pieces the notebook relies on, without a run


def test_wait_for_lock_waits_while_the_holder_lives_with_a_countdown_then_takes_it(tmp_path, monkeypatch, capsys):
    """A lock that does not change (a lost VM's) is taken over after the watch, with or without --wait-for-lock; one
    that keeps changing (its holder lives) is refused at once without --wait-for-lock, and with it waited for (a line
    per try) until its holder stops refreshing, then taken over; a wait too short ends with the lock's refusal."""
    import threading
    import time
    from contextlib import ExitStack

    import orchestrate
    from trainable.errors import AstCvError
    from trainable.store.lock import STALE_ENV

    def write(count):
        (tmp_path / ".astcv.lock").write_text(json.dumps({"pid": 4242, "host": "lost-colab-vm", "started": "earlier",
                                                          "command": ["python", "orchestrate.py"], "count": count}))

    def holder(refreshes, gone):  # a live orchestrator on another host: it rewrites its lock, then its VM goes away
        for i in range(refreshes):
            if gone.is_set():
                return
            write(i)
            time.sleep(0.1)

    monkeypatch.setenv(STALE_ENV, "1")
    write(0)
    with ExitStack() as held:  # unchanged for the watch: taken over, no wait needed
        orchestrate.hold_lock(held, tmp_path, 0)
        assert json.loads((tmp_path / ".astcv.lock").read_text())["pid"] == os.getpid()
    for wait, refreshes in ((0, 10**6), (0.5, 10**6), (60, 25)):
        gone = threading.Event()
        write(-1)  # held before this run looks
        alive = threading.Thread(target=holder, args=(refreshes, gone), daemon=True)
        alive.start()
        try:
            if refreshes > 1000:
                with pytest.raises(AstCvError, match="being run by another orchestrator"), ExitStack() as held:
                    orchestrate.hold_lock(held, tmp_path, wait)
                continue
            with ExitStack() as held:
                orchestrate.hold_lock(held, tmp_path, wait)
                assert json.loads((tmp_path / ".astcv.lock").read_text())["pid"] == os.getpid()
        finally:
            gone.set()
            alive.join()
    out = capsys.readouterr().out
    assert out.count("Waiting for the lock (--wait-for-lock): Experiment ") >= 1 and "giving up in" in out


def test_progress_without_a_terminal_is_a_line_per_tenth(capsys):
    """In a notebook's run() (a pipe) the feature cache's progress is whole lines, one per 10 %, not a redraw every 2 s."""
    from trainable.data.audio import LineProgress, progress_bar

    assert isinstance(progress_bar(10, "x"), LineProgress)  # pytest's stderr is not a terminal
    bar = LineProgress(1000, "feature cache", every_s=3600)
    for _ in range(1000):
        bar.update()
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and lines[0].startswith("feature cache: 100/1000 clips (10 %")
    assert lines[-1].startswith("feature cache: 1000/1000 clips (100 %")


def test_rays_token_notice_on_a_local_start_is_quieted():
    """Ray's 'Token authentication is enabled for this Ray cluster' (its own function, as ray.init calls it on a local
    start) is left out while the orchestrator runs; Ray's other warnings are not. Read with a handler on Ray's logger
    (what reaches any handler), not from the captured stderr, which other tests' handlers in this process may bypass."""
    import logging

    from ray._private.authentication.authentication_token_setup import _warn_token_auth_enabled

    from trainable.run.quiet import TOKEN_NOTICE_LOGGER, driver_env

    seen: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger(TOKEN_NOTICE_LOGGER)
    logger.addHandler(handler)
    try:
        with driver_env(debug=False):
            _warn_token_auth_enabled()
            logger.warning("another warning")
        quiet = list(seen)
        seen.clear()
        _warn_token_auth_enabled()
    finally:
        logger.removeHandler(handler)
    assert not any("Token authentication is enabled" in m for m in quiet) and "another warning" in quiet, quiet
    assert any("Token authentication is enabled" in m for m in seen), seen


def test_only_the_slow_snapshot_warning_of_tunes_quieted_ones_is_shown():
    """Tune's loggers are quiet while the orchestrator runs, except the warning that the experiment snapshot (what a
    resume restores from) is slow to reach storage; Tune's routine 'snapshotting has been triggered multiple times'
    (every checkpoint forces one here) stays out. Ray's own logger and messages, read with a handler on it."""
    import logging

    from ray.tune.execution import experiment_state

    from trainable.run.quiet import driver_env

    seen: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = experiment_state.logger
    logger.addHandler(handler)
    try:
        with driver_env(debug=False):
            logger.warning("Experiment state snapshotting has been triggered multiple times in the last 5.0 seconds")
            logger.warning("Saving the experiment state (which holds a global view of trial statuses) has already "
                           "taken 31.00 seconds")
            logging.getLogger("ray.tune.tune").warning("quieted")
    finally:
        logger.removeHandler(handler)
    assert len(seen) == 1 and seen[0].startswith("Saving the experiment state"), seen
