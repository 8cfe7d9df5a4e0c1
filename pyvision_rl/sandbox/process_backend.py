"""Process backend: the kernel in a bubblewrap box, for machines without a Docker engine.

The box sees only what it needs, read-only: /usr (and the /bin, /lib* links), the Python installation
that runs the kernel (the host venv and its base interpreter), kernel.py and the task directory; it has a
private size-capped /tmp, fresh /dev and /proc, new PID/network/IPC/UTS namespaces (no network at all),
no capabilities and no new privileges. Memory, process and file-size caps are rlimits the kernel's zygote
sets on each trajectory's forked interpreter (no cgroups needed), so they count per trajectory also when
a box is reused (sandbox.reuse_kernels).

When run as root, bwrap keeps uid 0 outside its user namespace, and the kernel would be exempt from
RLIMIT_NPROC (a fork bomb would not be stopped). So as root the box is made without a user namespace and
the kernel drops to its own unprivileged uid (setpriv; a distinct uid per box so that each box has its
own process count). As a normal user, bwrap makes a user namespace and the count is per namespace.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from pyvision_rl.config import SandboxConfig
from pyvision_rl.sandbox.base import (
    KERNEL_PATH,
    Box,
    KernelDied,
    KernelTimeout,
    PooledSandbox,
    SandboxError,
    TaskDir,
    kernel_settings,
)

_REQUIRED = ("numpy", "PIL", "matplotlib", "av")
_uid_counter = itertools.count()
_python_cache: dict[str, str] = {}


def find_python() -> str:
    """The interpreter for the kernel: this process's Python if it has numpy/PIL/matplotlib/av (the
    project venv does), else /usr/bin/python3 if that has them."""
    if "python" in _python_cache:
        return _python_cache["python"]
    import importlib.util

    if all(importlib.util.find_spec(m) is not None for m in _REQUIRED):  # this interpreter: no probe process
        _python_cache["python"] = sys.executable
        return sys.executable
    probe = "import " + ", ".join(_REQUIRED)
    for cand in ("/usr/bin/python3",):
        if cand and os.path.exists(cand):
            r = subprocess.run([cand, "-c", probe], capture_output=True, timeout=60)
            if r.returncode == 0:
                _python_cache["python"] = cand
                return cand
    raise SandboxError(
        "no Python with numpy, Pillow, matplotlib and av found for the process sandbox (tried "
        f"{sys.executable} and /usr/bin/python3); run `make setup`, or install python3-numpy "
        "python3-pil python3-matplotlib python3-av"
    )


def _python_roots(python: str) -> list[str]:
    """Directories the kernel's Python needs: its prefix, base prefix and the real executable's tree."""
    if python == sys.executable:
        prefix, base, exec_prefix, real = (
            sys.prefix,
            sys.base_prefix,
            sys.exec_prefix,
            os.path.realpath(python),
        )
    else:
        code = "import sys, os; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.realpath(sys.executable)]))"
        r = subprocess.run([python, "-c", "import json; " + code], capture_output=True, text=True, timeout=60)
        prefix, base, exec_prefix, real = json.loads(r.stdout)
    roots = {prefix, base, exec_prefix, os.path.dirname(os.path.dirname(real))}
    # /usr is bound anyway; drop roots inside it and nested duplicates.
    roots = sorted(r for r in roots if r and not (r == "/usr" or r.startswith("/usr/")))
    kept: list[str] = []
    for r_ in roots:
        if not any(r_.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(r_)
    return kept


class ProcessBox(Box):
    """One bwrap'd kernel process; talks over its stdin/stdout pipes."""

    def __init__(
        self,
        cmd: list[str],
        taskdir: TaskDir,
        env: dict[str, str],
        ready_timeout_s: float,
        spawner: ThreadPoolExecutor,
    ) -> None:
        super().__init__(taskdir)
        self._killed = False
        # start_new_session: the whole box is one process group we can kill; no preexec_fn (unsafe in
        # multi-threaded parents such as Ray workers). Spawned from the sandbox's long-lived spawner
        # thread: bwrap's --die-with-parent fires when the *thread* that forked it exits, and a box (above
        # all a reused one) outlives the short-lived thread that happened to open it.
        self.proc = spawner.submit(
            subprocess.Popen,
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,  # only start-up errors land here: the kernel moves fd 2 at once
            env=env,
            start_new_session=True,
            close_fds=True,
        ).result()
        self._out = self.proc.stdout.fileno()
        self._buf = bytearray()
        try:
            self.wait_ready(ready_timeout_s)
        except (KernelDied, KernelTimeout) as e:
            err = b""
            try:
                self.proc.kill()
                err = self.proc.stderr.read()[-2000:]
            except (OSError, ValueError):
                pass
            self.kill()
            raise KernelDied(f"{e}; stderr: {err.decode('utf-8', 'replace').strip()}") from e
        except Exception:
            self.kill()
            raise

    def send(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError) as e:
            raise KernelDied(str(e)) from e

    def recv_exact(self, n: int, deadline: float | None) -> bytes:
        while len(self._buf) < n:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                raise KernelTimeout()
            ready, _, _ = select.select([self._out], [], [], wait)
            if not ready:
                raise KernelTimeout()
            chunk = os.read(self._out, max(65536, n - len(self._buf)))
            if not chunk:
                raise KernelDied("end of stream")
            self._buf += chunk
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def death_reason(self) -> str:
        try:
            rc = self.proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            return "no reply from the interpreter"
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = str(-rc)
            return f"killed by signal {name}"
        if rc == 137 or rc == 139:  # bwrap's init reports the child's signal as 128+n
            return f"exit status {rc} ({'killed' if rc == 137 else 'segmentation fault'})"
        return f"exit status {rc}"

    def kill(self) -> None:
        if self._killed:
            return
        self._killed = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.taskdir.remove()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        # Reap in the background so a kill never blocks the caller.
        threading.Thread(target=self._reap, daemon=True).start()

    def _reap(self) -> None:
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


class ProcessSandbox(PooledSandbox):
    """Kernels in bubblewrap boxes (see the module docstring for the isolation)."""

    name = "process"

    def __init__(self, cfg: SandboxConfig) -> None:
        self.python = ""
        self._roots: list[str] = []
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="process-sandbox-spawner")
        super().__init__(cfg)

    def close(self) -> None:
        super().close()
        self._spawner.shutdown(wait=False)

    def _check(self) -> None:
        if shutil.which("bwrap") is None:
            raise SandboxError(
                "sandbox.backend=process needs bubblewrap: install it (`apt-get install bubblewrap`, or "
                "`make sysdeps`), or use sandbox.backend=docker"
            )
        self.python = find_python()
        self._roots = _python_roots(self.python)
        self._as_root = os.geteuid() == 0
        if self._as_root and shutil.which("setpriv") is None:
            raise SandboxError(
                "the process sandbox runs as root and needs setpriv (Debian util-linux) to drop privileges"
            )

    def command(self, taskdir: TaskDir) -> list[str]:
        cfg = self.cfg
        cmd = ["bwrap", "--die-with-parent", "--new-session"]
        if self._as_root:
            cmd += [
                "--unshare-ipc",
                "--unshare-pid",
                "--unshare-net",
                "--unshare-uts",
                "--unshare-cgroup-try",
            ]
        else:
            cmd += ["--unshare-all"]
        cmd += ["--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                cmd += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                cmd += ["--ro-bind", top, top]
        # The private /tmp comes before the interpreter binds: a project (and its venv) living under /tmp
        # must stay visible inside the box, bound read-only over the fresh tmpfs.
        cmd += ["--size", str(cfg.tmpfs_mb * 1024 * 1024), "--perms", "1777", "--tmpfs", "/tmp"]
        # bwrap creates missing parents of a mount point with mode 0700; the box's uid must traverse them.
        parents: list[str] = []
        for target in [*self._roots, "/opt/pyvision/kernel.py", taskdir.mount_point]:
            d = os.path.dirname(target)
            chain = []
            while d not in ("/", "") and d not in parents:
                chain.append(d)
                d = os.path.dirname(d)
            parents += reversed(chain)
        for d in parents:
            if not (d == "/usr" or d.startswith("/usr/")):
                cmd += ["--perms", "0755", "--dir", d]
        for root in self._roots:
            cmd += ["--ro-bind", root, root]
        cmd += [
            "--ro-bind", KERNEL_PATH, "/opt/pyvision/kernel.py",
            "--ro-bind", taskdir.host, taskdir.mount_point,
            "--dev", "/dev",
            "--proc", "/proc",
            "--chdir", "/tmp",
            "--cap-drop", "ALL",
        ]  # fmt: skip
        inner = [
            self.python,
            "-s",
            "-E",
            "/opt/pyvision/kernel.py",
            json.dumps(kernel_settings(cfg, rlimits=True)),
        ]
        if self._as_root:
            # The box's own unprivileged uid (see module docstring). setpriv needs SETUID/SETGID inside;
            # after the switch the process holds no capabilities at all.
            uid = 200_000 + (os.getpid() % 1000) * 1000 + next(_uid_counter) % 1000
            cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
            inner = [
                "/usr/bin/setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
            ] + inner  # fmt: skip
        return cmd + ["--"] + inner

    def _env(self) -> dict[str, str]:
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": "/tmp",
            "TMPDIR": "/tmp",
            "MPLCONFIGDIR": "/tmp/.mpl",
            "MPLBACKEND": "Agg",
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "LANG": "C.UTF-8",
        }
        return env

    def _start_box(self) -> ProcessBox:
        taskdir = TaskDir("/task")
        try:
            return ProcessBox(self.command(taskdir), taskdir, self._env(), 60.0, self._spawner)
        except KernelDied as e:
            taskdir.remove()
            raise SandboxError(
                f"the process sandbox kernel did not start ({e}); try `pyvision-rl sandbox run`"
                " on a small file to see the error"
            ) from e
        except Exception:
            taskdir.remove()
            raise
