"""The sandbox: `make_sandbox` picks a backend (docker or process); see the README's "Architecture".

The backends import `sandbox.base`; only this package entry imports the backends (lazily), so there is
no import circle between the contract and its implementations.
"""

from __future__ import annotations

from pyvision_rl.config import SandboxConfig
from pyvision_rl.sandbox.base import Sandbox, SandboxError


def make_sandbox(cfg: SandboxConfig | None = None) -> Sandbox:
    """Build the backend named by `cfg.backend` ('docker', 'process', or 'auto': docker if an engine
    answers and the image exists, else process)."""
    cfg = cfg or SandboxConfig()
    backend = cfg.backend
    if backend == "auto":
        from pyvision_rl.sandbox.docker_backend import docker_available

        backend = "docker" if docker_available(cfg.image)[0] else "process"
    if backend == "docker":
        from pyvision_rl.sandbox.docker_backend import DockerSandbox

        return DockerSandbox(cfg)
    if backend == "process":
        from pyvision_rl.sandbox.process_backend import ProcessSandbox

        return ProcessSandbox(cfg)
    raise SandboxError(f"sandbox.backend={cfg.backend!r} is not one of docker, process, auto")
