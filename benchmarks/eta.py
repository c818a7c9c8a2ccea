#!/usr/bin/env python
"""The grid's ETA against the time the grid really took: record a real run's timeline, replay it through the estimator.

    python benchmarks/eta.py record fresh  tests/data/timelines/demo_fresh.json    # the demo, start to end
    python benchmarks/eta.py record resume tests/data/timelines/demo_resume.json   # Ctrl-C after 3 trials, then --resume
    python benchmarks/eta.py record retry  tests/data/timelines/demo_retry.json    # one trial's worker killed, retried
    python benchmarks/eta.py replay tests/data/timelines/*.json [--estimator GIT_REV]

``record`` runs the built-in demo (4 folds x 2 learning rates x 3 epochs, CPU) through orchestrate.py with
ASTCV_TIMELINE set: the driver writes every call the console's Progress received (trial starts, epoch results,
finishes, failures) with its time and Ray's view of the trials. ``replay`` feeds those calls to a Progress on a
replayed clock and prints each line's ETA beside the time the grid really needed from there (the last trial's end);
``--estimator REV`` replays through trainable/run/progress.py as it was at git revision REV (before/after figures).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
       "PYTHONUNBUFFERED": "1"}
DEMO_TRIALS = 8


# ---------------------------------------------------------------- recording


def demo_cwd(work: Path) -> Path:
    """A folder whose ./demo holds the demo's assets (the tests' cached copy when there is one: no minute of
    pretraining)."""
    cwd = work / "cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    cached = sorted((Path.home() / ".cache" / "ast-cv" / "test-assets").glob("demo-*/tiny-ast/model.safetensors"))
    if cached and not (cwd / "demo").exists():
        (cwd / "demo").symlink_to(cached[-1].parent.parent)
    return cwd


def orchestrate(work: Path, timeline: Path | None, *extra: str) -> subprocess.Popen:
    env = {**ENV, **({"ASTCV_TIMELINE": str(timeline)} if timeline else {})}
    cmd = [sys.executable, str(ROOT / "orchestrate.py"), "--demo", "--storage-path", str(work / "runs"), *extra]
    return subprocess.Popen(cmd, cwd=demo_cwd(work), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def rows(work: Path) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for f in (work / "runs" / "demo").glob("fold*/result.json"):
        out[f.parent.name] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def wait_for(what: Callable[[], Any], proc: subprocess.Popen, deadline_s: float = 900) -> Any:
    end = time.time() + deadline_s
    while time.time() < end and proc.poll() is None:
        found = what()
        if found:
            return found
        time.sleep(0.2)
    raise SystemExit(f"gave up waiting (exit status {proc.poll()})")


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def record(kind: str, out_path: Path) -> None:
    out_path = out_path.resolve()
    with tempfile.TemporaryDirectory(prefix="astcv-eta-") as tmp:
        work = Path(tmp)
        if kind == "fresh":
            log = finish(orchestrate(work, out_path))
        elif kind == "retry":
            proc = orchestrate(work, out_path)
            victim = wait_for(lambda: next((r[0] for n, r in sorted(rows(work).items())
                                            if n.startswith("fold02") and r), None), proc)
            os.kill(victim["pid"], signal.SIGKILL)  # the worker dies after its first epoch: Ray retries the trial
            log = finish(proc)
        elif kind == "resume":
            proc = orchestrate(work, None)
            wait_for(lambda: sum(len(r) >= 3 for r in rows(work).values()) >= 3, proc)
            os.kill(proc.pid, signal.SIGINT)  # Ctrl-C with 3 trials finished, others part way
            finish(proc)
            log = finish(orchestrate(work, out_path, "--resume", "--name", "demo"))
        else:
            raise SystemExit(f"unknown kind {kind!r}")
        print(log)
    data = compact(json.loads(out_path.read_text()))
    data["label"] = kind
    out_path.write_text(json.dumps(data, separators=(",", ":")))
    print(f"recorded {len(data['events'])} events into {out_path}")


def compact(timeline: dict[str, Any]) -> dict[str, Any]:
    """A smaller file that replays the same: numbers to the millisecond, and each trial's last result in Ray's views
    only where it changed (the estimator reads them for the best accuracy and, before its first epoch, for the
    measured times), without the start-up pieces (the results carry them)."""
    def rounded(value):
        if isinstance(value, float):
            return round(value, 3)
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rounded(v) for v in value]
        return value

    seen: dict[str, Any] = {}
    for event in timeline["events"]:
        for view in event.get("views", []):
            last = {k: v for k, v in view[3].items() if k != "startup"}
            view[3] = {} if seen.get(view[0]) == last else last
            seen[view[0]] = last
    return rounded(timeline)


# ---------------------------------------------------------------- replaying


def seconds(text: str) -> float:
    """'1h05m', '12m30s', '45s' (progress.duration) back to seconds."""
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if not m or not text:
        raise ValueError(text)
    h, mi, s = (int(g or 0) for g in m.groups())
    return 3600 * h + 60 * mi + s


ETA = re.compile(r"(?:\| ETA (\S+)|the grid needs about (\S+) more)")


def load_progress_module(rev: str | None):
    """trainable.run.progress, or its source at git revision ``rev`` (loaded as a module of its own)."""
    if rev is None:
        from trainable.run import progress

        return progress
    source = subprocess.run(["git", "show", f"{rev}:trainable/run/progress.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    spec = importlib.util.spec_from_loader(f"trainable.run.progress_{rev}", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "trainable.run"
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f"progress@{rev}", "exec"), module.__dict__)
    return module


class Clock:
    """The replayed time, for ``now=`` and for an old estimator's ``time.time``."""

    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def time(self) -> float:
        return self.t

    def perf_counter(self) -> float:
        return self.t


def grid_end(events: list[dict[str, Any]]) -> float:
    """When the last trial ended (finished, or failed for good)."""
    return max(e["t"] for e in events if e["kind"] == "trial_finished" or (e["kind"] == "trial_failed" and e["final"]))


def replay(timeline: dict[str, Any], module=None) -> list[dict[str, Any]]:
    """Each console line with an ETA: {t, eta, real, line} (t from the session's start, seconds)."""
    module = module or load_progress_module(None)
    events = timeline["events"]
    clock = Clock(events[0]["t"])
    lines: list[tuple[float, str]] = []
    kwargs: dict[str, Any] = {"out": lambda text, **_: lines.append((clock.t, text))}
    if "now" in module.Progress.__init__.__code__.co_varnames:
        kwargs["now"] = clock
    else:
        module.time = clock  # an old estimator reads time.time() itself
    progress = module.Progress(timeline["expected"], set(timeline["finished_before"]), timeline["epochs"],
                               timeline["slots"], **kwargs)
    view = lambda e: [module.TrialView(n, s, d, r) for n, s, d, r in e.get("views", [])]  # noqa: E731
    for e in events:
        clock.t = e["t"]
        kind = e["kind"]
        if kind == "start":
            progress.start()
        elif kind == "trial_started":
            progress.trial_started(e["trial"], view(e))
        elif kind == "result":
            progress.result(e["trial"], e["result"], view(e))
        elif kind == "trial_finished":
            progress.trial_finished(e["trial"], view(e))
        elif kind == "trial_failed":
            progress.trial_failed(e["trial"], e["error"], e["where"], view(e), e["final"])
        elif kind == "poll":
            progress.poll(view(e), [tuple(m) for m in e["messages"]])
    end, t0 = grid_end(events), events[0]["t"]
    out = []
    for t, text in lines:
        m = ETA.search(text)
        if m and t <= end:
            out.append({"t": round(t - t0, 1), "eta": float(seconds(m[1] or m[2])), "real": round(end - t, 1),
                        "line": text})
    return out


def first_estimate_error(rows: list[dict[str, Any]]) -> float:
    """(estimate - real) / real of the first line with an estimate."""
    first = rows[0]
    return (first["eta"] - first["real"]) / max(first["real"], 1e-9)


def rises(rows: list[dict[str, Any]], limit: float = 0.10) -> list[tuple[dict, dict]]:
    """Pairs of consecutive lines whose ETA rose by more than ``limit`` without the line saying why."""
    return [(a, b) for a, b in zip(rows, rows[1:])
            if b["eta"] > a["eta"] * (1 + limit) + 1 and "ETA up" not in b["line"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record", help="run the demo and record its timeline")
    r.add_argument("kind", choices=["fresh", "resume", "retry"], help="which run to record")
    r.add_argument("out", type=Path, help="the timeline's JSON file")
    c = sub.add_parser("compact", help="rewrite recorded timelines smaller (same replay)")
    c.add_argument("timelines", nargs="+", type=Path, help="timeline JSON files")
    q = sub.add_parser("replay", help="replay timelines through the estimator")
    q.add_argument("timelines", nargs="+", type=Path, help="timeline JSON files")
    q.add_argument("--estimator", default=None, help="git revision of trainable/run/progress.py (default: this tree)")
    q.add_argument("--lines", action="store_true", help="print every line, not only the ETAs")
    args = p.parse_args(argv)
    if args.command == "record":
        record(args.kind, args.out)
        return 0
    if args.command == "compact":
        for path in args.timelines:
            path.write_text(json.dumps(compact(json.loads(path.read_text())), separators=(",", ":")))
        return 0
    module = load_progress_module(args.estimator)
    for path in args.timelines:
        out = replay(json.loads(path.read_text()), module)
        print(f"{path.name} (estimator {args.estimator or 'this tree'}): first estimate "
              f"{out[0]['eta']:.0f} s vs real {out[0]['real']:.0f} s ({100 * first_estimate_error(out):+.1f} %), "
              f"{len(rises(out))} unexplained rise(s) > 10 %")
        for row in out:
            print(f"  t={row['t']:6.1f}s  eta {row['eta']:6.0f} s  real {row['real']:6.1f} s  "
                  f"{100 * (row['eta'] - row['real']) / max(row['real'], 1):+6.1f} %" + (f"  {row['line']}" if args.lines else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
