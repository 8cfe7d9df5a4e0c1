"""Shared fixtures. Keep this file small: fixtures used by several test modules only."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _tiny_model_key() -> str:
    """Hash of everything that decides the tiny model's files, so a cached build is never stale."""
    import transformers

    h = hashlib.sha256(transformers.__version__.encode())
    files = [
        REPO / "pyvision_rl/models/tiny.py",
        REPO / "pyvision_rl/models/loading.py",
        REPO / "pyvision_rl/data/synthetic.py",
        REPO / "pyvision_rl/config.py",
        *sorted((REPO / "pyvision_rl/agent/templates").glob("*.json")),
    ]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes() if f.is_file() else b"")
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A tiny Qwen2.5-VL checkpoint dir (default TinyModelConfig, seed 0), built once and cached under
    .cache/test-models/<hash of its sources>. Treat it as read-only."""
    from pyvision_rl.models.tiny import make_tiny_model

    cache = REPO / ".cache" / "test-models"
    final = cache / _tiny_model_key()
    if not (final / "model.safetensors").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".build-{uuid.uuid4().hex}"
        make_tiny_model(tmp, seed=0)
        try:
            tmp.rename(final)  # atomic: parallel sessions never see a half-written dir
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray on 2 CPUs for the module; its workers see the tests' TORCH_EXTENSIONS_DIR."""
    ray = pytest.importorskip("ray")
    env = {k: os.environ[k] for k in ("TORCH_EXTENSIONS_DIR",) if k in os.environ}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        ignore_reinit_error=True,
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    yield ray
    ray.shutdown()
