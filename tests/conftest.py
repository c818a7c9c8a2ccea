"""Shared fixtures: generated UrbanSound8K-shaped data and tiny AST checkpoints, built once per test session."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import pytest
from filelock import FileLock

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # two test processes share the cores: torch's default of a thread per core in
    # each (and in the processes they start) makes CPU training 5-10x slower, each thread waiting on the other's core
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# torch.compile's kernels (the compiled-path test) kept between test sessions, like the demo assets below
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.expanduser("~/.cache/ast-cv/test-inductor"))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small generated dataset: 4 folds x 10 classes x 2 clips, every WAV kind."""
    from trainable.data.synth import generate

    root = tmp_path_factory.mktemp("us8k-small")
    generate(root, clips_per_class=2, folds=(1, 2, 3, 4), seed=0)
    return root


DEMO_SOURCES = ("run/demo.py", "data/synth.py", "fit/model.py", "data/features.py", "data/audio.py", "fit/steps.py", "fit/train.py",
                "fit/oom.py", "data/metadata.py")


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """(dataset, tiny pretrained AST) exactly as the demo builds them: the learnable setting.

    Building them takes about a minute (the pretraining); they are kept between test sessions under
    ~/.cache/ast-cv/test-assets (ASTCV_TEST_ASSETS overrides), keyed by the code that builds them and the library
    versions, so a change to any of those builds them anew. Tests copy what they modify.
    """
    import hashlib
    import shutil
    from importlib import metadata
    from pathlib import Path

    from trainable.run.demo import ensure_demo_assets

    root = Path(__file__).resolve().parent.parent / "trainable"
    h = hashlib.sha256()
    for name in DEMO_SOURCES:
        h.update((root / name).read_bytes())
    for package in ("torch", "transformers", "numpy", "soundfile", "torchaudio"):
        h.update(metadata.version(package).encode())
    cache = Path(os.environ.get("ASTCV_TEST_ASSETS", "~/.cache/ast-cv/test-assets")).expanduser()
    done = cache / f"demo-{h.hexdigest()[:16]}"
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / ".build.lock")):  # parallel test workers (pytest -n): one builds, the others wait
        if not (done / "tiny-ast" / "model.safetensors").is_file():
            building = tmp_path_factory.mktemp("demo")
            ensure_demo_assets(building)
            staged = cache / f".{done.name}.{os.getpid()}"
            for part in ("data", "tiny-ast"):  # not the pretraining data
                shutil.copytree(building / part, staged / part)
            shutil.rmtree(done, ignore_errors=True)
            staged.rename(done)
            for old in cache.glob("demo-*"):  # assets of older code are dead weight
                if old != done:
                    shutil.rmtree(old, ignore_errors=True)
    return done / "data", done / "tiny-ast"


@pytest.fixture(scope="session")
def tiny_ast_1024(tmp_path_factory):
    """A random tiny AST saved at 1024 frames with a 527-class head (like the hub checkpoint's geometry)."""
    from trainable.fit.model import build_tiny_ast

    return build_tiny_ast(tmp_path_factory.mktemp("tiny-ast-1024"), num_labels=527, max_length=1024)


@pytest.fixture(scope="session")
def exported(tiny_ast_1024, tmp_path_factory):
    """A tiny AST with a 10-class head, exported as orchestrate.py exports best_model/ (for predict.py)."""
    from trainable.data.metadata import US8K_CLASSES
    from trainable.fit.model import export_model, load_model

    out = tmp_path_factory.mktemp("exported")
    return export_model(load_model(str(tiny_ast_1024), list(US8K_CLASSES), num_frames=400), out, 400)


@contextlib.contextmanager
def moto_server(monkeypatch, **server_env):
    """moto's standalone S3 server on a free port, the AWS variables pointing at it; yields the port once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, **server_env})
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        deadline = time.time() + 30
        while True:  # the port answers (no request spent: a server counting requests sees only the test's)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, "moto's server did not start"
                time.sleep(0.2)
        yield port
    finally:
        server.kill()
        server.wait()


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A real S3 protocol server (moto's standalone server) with an empty bucket; the AWS variables point at it."""
    boto3 = pytest.importorskip("boto3")
    with moto_server(monkeypatch):
        boto3.client("s3").create_bucket(Bucket="astcv-test")
        yield "s3://astcv-test/runs"


@pytest.fixture
def local_ray():
    """A one-CPU Ray of the test's own (never another one running on the machine), shut down after the test."""
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
