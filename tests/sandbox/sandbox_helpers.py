"""Helpers shared by the sandbox tests (a uniquely named module: tests/conftest.py is `conftest`)."""

from __future__ import annotations

import shutil

import pytest

from pyvision_rl.config import SandboxConfig

IMAGE = "pyvision-sandbox:latest"


def sandbox_cfg(backend: str, **kw) -> SandboxConfig:
    base = dict(
        backend=backend,
        image=IMAGE,
        warm_kernels=2,
        timeout_s=3.0,
        memory_mb=512,
        pids=64,
        tmpfs_mb=16,
        max_stdout_bytes=2048,
        max_images_per_exec=4,
        max_image_pixels=1_000_000,
    )
    base.update(kw)
    return SandboxConfig(**base)


def skip_reason(backend: str) -> str | None:
    if backend == "docker":
        from pyvision_rl.sandbox.docker_backend import docker_available

        ok, why = docker_available(IMAGE)
        return None if ok else f"docker backend unavailable: {why}"
    if shutil.which("bwrap") is None:
        return "process backend unavailable: bubblewrap is not installed (make sysdeps)"
    return None


BACKENDS = [
    pytest.param("process", id="process"),
    pytest.param("docker", id="docker", marks=pytest.mark.docker),
]

# (backend, reuse_kernels): every interpreter-level test runs in both modes: a fresh box per trajectory,
# and the fork-server mode where one box's zygote serves trajectory after trajectory.
BACKEND_MODES = [
    pytest.param(("process", False), id="process-fresh"),
    pytest.param(("process", True), id="process-reuse"),
    pytest.param(("docker", False), id="docker-fresh", marks=pytest.mark.docker),
    pytest.param(("docker", True), id="docker-reuse", marks=pytest.mark.docker),
]
