"""The sandbox contract (README, "Architecture") and the machinery both backends share.

`Sandbox.open(images, videos) -> Kernel` gives a persistent interpreter for one trajectory;
`Kernel.execute(code, timeout_s) -> ExecResult` never raises: a timeout, a crash or a dead box come back
as an error result, and the next `execute` on the same Kernel transparently starts a fresh interpreter
(the earlier variables are lost; the error text says so). A failure of the sandbox itself, not of the
model's code (no box could be started, a box killed from outside), sets `ExecResult.sandbox_error`.
`SandboxError` is raised only by `open` and setup: problems a user must fix (no engine, no image, missing
bubblewrap, unreadable task file) or boxes that repeatedly fail to start.

Under load nothing is charged to the model: at most `sandbox.max_starting` boxes start at once (a burst
of opens waits its turn), and at most `sandbox.max_running` cells run at once, each cell's timeout
starting only when it holds a run slot.

Both backends run `kernel.py` as a long-lived process and talk to it over its stdin/stdout with
length-prefixed JSON frames; only how the process is started, killed and how bytes travel differs.

The box's process is a zygote (see kernel.py): it pays the numpy/PIL/matplotlib import once and forks a
fresh interpreter per trajectory. With `sandbox.reuse_kernels=false` (default) a box serves one
trajectory and is then killed. With `reuse_kernels=true` a closed trajectory's box is cleaned by the
zygote (every process but the zygote killed, /tmp and other writable dirs wiped, SysV IPC removed), its
task directory is emptied, and it goes back to the warm pool, up to `max_trajectories_per_box` times; a
box whose trajectory timed out, crashed or could not be cleaned is killed instead.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import struct
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator

from pyvision_rl.config import SandboxConfig
from pyvision_rl.types import ExecResult

KERNEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel.py")


class SandboxError(RuntimeError):
    """A setup problem the user must fix; the message says what to do."""


class KernelDied(Exception):
    """Internal: the kernel process ended or the channel broke."""


class KernelTimeout(Exception):
    """Internal: no reply before the deadline."""


class Kernel(ABC):
    """A persistent interpreter for one trajectory."""

    @abstractmethod
    def execute(self, code: str, timeout_s: float | None = None) -> ExecResult:
        """Run one cell; never raises. `timeout_s=None` uses the sandbox's `timeout_s`."""

    @abstractmethod
    def close(self) -> None:
        """Discard the interpreter and its box (idempotent)."""

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sandbox(ABC):
    """A source of kernels (a backend plus its warm pool)."""

    name: str = "abstract"

    @abstractmethod
    def open(self, images: list[str] | None = None, videos: list[str] | None = None) -> Kernel:
        """A fresh kernel with `image_clue_i` / `video_clue_i` bound to the given files (read-only)."""

    @abstractmethod
    def close(self) -> None:
        """Stop every kernel and warm box this sandbox started."""

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ framing
def encode_frame(msg: dict) -> bytes:
    data = json.dumps(msg).encode("utf-8")
    return struct.pack(">I", len(data)) + data


def kernel_settings(cfg: SandboxConfig, rlimits: bool) -> dict:
    """The kernel's argv[1]: output/figure caps, and rlimits for backends without cgroups."""
    s = {
        "max_stdout_bytes": cfg.max_stdout_bytes,
        "max_images": cfg.max_images_per_exec,
        "max_pixels": cfg.max_image_pixels,
    }
    if rlimits:
        s.update(
            memory_bytes=cfg.memory_mb * 1024 * 1024,
            nproc=cfg.pids,
            fsize_bytes=cfg.tmpfs_mb * 1024 * 1024,
        )
    return s


# ------------------------------------------------------------------------------------------ task files
class TaskDir:
    """A per-box host directory, mounted read-only in the box at `mount_point`, that receives the task's
    files when the box is handed to a trajectory.

    Why: a warm box is started before its task is known, and neither Docker nor bwrap can add a mount to
    a running box. Files placed later in an already-mounted directory appear inside it, so `stage()` hard-
    links them in (O(1), no copy for big videos) or copies them (other filesystem, or a file the box's
    non-root user could not read: hard links share the inode's mode, which we must not change). Sending
    bytes over the channel would work for images but costs a copy of every video through a pipe.
    """

    def __init__(self, mount_point: str, root: str | None = None) -> None:
        self.host = tempfile.mkdtemp(prefix="pyvision-sbx-", dir=root)
        os.chmod(self.host, 0o755)
        self.mount_point = mount_point
        self._n = 0

    def stage(self, paths: list[str], kind: str) -> list[str]:
        """Place `paths` in the directory; returns their paths as the box sees them."""
        out = []
        for p in paths:
            if not os.path.isfile(p):
                raise SandboxError(
                    f"task {kind} file {p!r} does not exist or is not a file; fix the task row"
                )
            base = os.path.basename(p)
            name = f"{kind}_{self._n}_{base}"
            self._n += 1
            dst = os.path.join(self.host, name)
            st = os.stat(p)
            linked = False
            if st.st_mode & 0o004:  # world-readable: the box user can read a hard link
                try:
                    os.link(p, dst)
                    linked = True
                except OSError:
                    linked = False
            if not linked:
                try:
                    shutil.copyfile(p, dst)
                except OSError as e:
                    raise SandboxError(f"cannot read task {kind} file {p!r}: {e}") from e
                os.chmod(dst, 0o644)
            out.append(f"{self.mount_point}/{name}")
        return out

    def clear(self) -> bool:
        """Remove every staged file (between two trajectories of a reused box); True when empty."""
        for name in os.listdir(self.host):
            p = os.path.join(self.host, name)
            try:
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                else:
                    os.unlink(p)
            except OSError:
                pass
        return not os.listdir(self.host)

    def remove(self) -> None:
        shutil.rmtree(self.host, ignore_errors=True)


# ------------------------------------------------------------------------------------------ boxes
class Box(ABC):
    """One started kernel process in its box (container or bwrap), before/after it serves a task."""

    def __init__(self, taskdir: TaskDir) -> None:
        self.taskdir = taskdir
        self.started_at = time.monotonic()
        self.pid_in_box: int | None = None
        self.uses = 0  # trajectories served (reuse_kernels)
        self.zygote = False
        self.died_reason: str | None = None  # what the zygote said when the trajectory child died

    @abstractmethod
    def send(self, data: bytes) -> None:
        """Write raw bytes to the kernel's stdin (raises KernelDied)."""

    @abstractmethod
    def recv_exact(self, n: int, deadline: float | None) -> bytes:
        """Read n bytes of the kernel's stdout (raises KernelDied / KernelTimeout)."""

    @abstractmethod
    def kill(self) -> None:
        """Kill the box and free its resources (idempotent, fast; slow cleanup may run in background)."""

    @abstractmethod
    def death_reason(self) -> str:
        """Why the box died, for the error text (exit code, OOM)."""

    def request(self, msg: dict, deadline: float | None) -> dict:
        self.send(encode_frame(msg))
        return self.read_reply(deadline)

    def read_reply(self, deadline: float | None) -> dict:
        (n,) = struct.unpack(">I", self.recv_exact(4, deadline))
        reply = json.loads(self.recv_exact(n, deadline).decode("utf-8"))
        if isinstance(reply, dict) and reply.get("op") == "died":  # the zygote: the trajectory child died
            self.died_reason = str(reply.get("reason", "the interpreter died"))
            raise KernelDied(self.died_reason)
        return reply

    def end_trajectory(self, timeout_s: float = 10.0) -> bool:
        """Ask the zygote to kill the trajectory's processes and wipe the box; True when it is clean."""
        try:
            reply = self.request({"op": "end"}, time.monotonic() + timeout_s)
        except (KernelDied, KernelTimeout, OSError, ValueError, struct.error):
            return False
        return reply.get("op") == "clean" and bool(reply.get("ok"))

    def wait_ready(self, timeout_s: float) -> dict:
        try:
            reply = self.read_reply(time.monotonic() + timeout_s)
        except KernelTimeout as e:
            raise KernelTimeout(f"the kernel did not report ready within {timeout_s:g} s") from e
        if reply.get("op") != "ready":
            raise KernelDied(f"unexpected first message {reply!r}")
        self.pid_in_box = reply.get("pid")
        self.zygote = bool(reply.get("zygote"))  # False: an image built before the fork-server kernel
        return reply

    def healthy(self, timeout_s: float = 2.0) -> bool:
        try:
            return self.request({"op": "ping"}, time.monotonic() + timeout_s).get("op") == "pong"
        except (KernelDied, KernelTimeout, OSError, ValueError):
            return False


class WarmPool:
    """Keeps `size` started, ready boxes; `take()` hands out a healthy one (or starts one on demand).

    A background thread refills the pool; a box that fails its health check is killed and replaced.
    At most `max_starting` boxes start at a time (refill and on-demand together): a burst of opens waits
    its turn for a box instead of starting them all at once on a few cores, where every start would miss
    its ready deadline. With reuse (`max_boxes` > 0) handed-out boxes come back through `give_back` (or
    end in `discard`), and the refill also stops while ready + leased boxes reach `max_boxes`: otherwise
    every momentary dip of the ready list below `size` under load would start a box that a later
    `give_back` has no room for.
    """

    def __init__(self, start_box: Callable[[], Box], size: int, name: str, max_boxes: int = 0,
                 max_starting: int = 2) -> None:  # fmt: skip
        self._start_box = start_box
        self._size = max(0, int(size))
        self._max_boxes = max(self._size, int(max_boxes)) if max_boxes else 0  # 0: no reuse, no cap
        self._max_starting = max(1, int(max_starting))
        self._leased = 0  # boxes handed out (or being taken) and not yet given back or discarded
        self._ready: list[Box] = []
        self._lock = threading.Condition()
        self._closed = False
        self._starting = 0
        self.waiting = 0  # take() calls waiting for a ready box or a start slot
        self.started = 0
        self.replaced = 0
        self.start_failures = 0
        self._thread = threading.Thread(target=self._refill_loop, name=f"{name}-warm-pool", daemon=True)
        self._thread.start()

    def _refill_loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._wants_box():
                    self._lock.wait(timeout=1.0)
                if self._closed:
                    return
                self._starting += 1
            box = None
            try:
                box = self._start_box()
            except Exception:  # noqa: BLE001 - keep the refill thread alive; take() reports errors
                self.start_failures += 1
                time.sleep(1.0)
            finally:
                with self._lock:
                    self._starting -= 1
                    if box is not None:
                        if self._closed:
                            box.kill()
                        else:
                            self._ready.append(box)
                            self.started += 1
                    self._lock.notify_all()

    def _wants_box(self) -> bool:
        have = len(self._ready) + self._starting
        return have < self._size and self._starting < self._max_starting and self._has_room()

    def _has_room(self) -> bool:
        """Ready + starting + leased boxes stay under `max_boxes` (no cap without reuse)."""
        return not self._max_boxes or len(self._ready) + self._starting + self._leased < self._max_boxes

    def take(self, attempts: int = 3) -> Box:
        """A started, healthy box: a ready one if any, else one started now once a start slot is free
        (waiting meanwhile for whichever comes first). Raises SandboxError saying what failed after
        `attempts` failed starts, or when the pool is closed."""
        failures: list[str] = []
        with self._lock:
            self._leased += 1
        try:
            while True:
                with self._lock:
                    self.waiting += 1
                    while not self._closed and not self._ready and self._starting >= self._max_starting:
                        self._lock.wait()
                    self.waiting -= 1
                    if self._closed:
                        raise SandboxError("the sandbox is shut down")
                    box = self._ready.pop(0) if self._ready else None
                    if box is None:
                        self._starting += 1
                if box is not None:
                    if box.healthy():
                        return box
                    self.replaced += 1
                    box.kill()
                    continue
                try:
                    box = self._start_box()
                except Exception as e:  # noqa: BLE001 - retried, then reported with every cause
                    self.start_failures += 1
                    failures.append(f"{type(e).__name__}: {e}")
                    if len(failures) >= attempts:
                        raise SandboxError(
                            f"no sandbox box could be started ({len(failures)} tries): " + "; ".join(failures)
                        ) from e
                    continue
                finally:
                    with self._lock:
                        self._starting -= 1
                        self._lock.notify_all()
                self.started += 1
                return box
        except BaseException:
            self._forget()
            raise

    def _forget(self) -> None:
        with self._lock:
            self._leased -= 1
            self._lock.notify_all()

    def give_back(self, box: Box) -> None:
        """Return a cleaned, handed-out box for the next trajectory. Returned boxes go first in line:
        they are the ones whose start-up cost is already paid."""
        with self._lock:
            self._leased -= 1
            keep = not self._closed and self._has_room()
            if keep:
                self._ready.insert(0, box)
            self._lock.notify_all()
        if not keep:
            box.kill()

    def discard(self, box: Box) -> None:
        """Kill a handed-out box (its trajectory is over, timed out or crashed)."""
        self._forget()
        box.kill()

    def ready_count(self) -> int:
        with self._lock:
            return len(self._ready)

    def wait_full(self, timeout_s: float = 60.0) -> bool:
        """Block until the pool holds `size` ready boxes (benchmarks and tests)."""
        end = time.monotonic() + timeout_s
        with self._lock:
            while len(self._ready) < self._size and time.monotonic() < end:
                self._lock.wait(timeout=0.1)
            return len(self._ready) >= self._size

    def close(self) -> None:
        with self._lock:
            self._closed = True
            boxes, self._ready = self._ready, []
            self._lock.notify_all()
        for b in boxes:
            b.kill()
        self._thread.join(timeout=30)  # a box being started is killed by the refill thread itself


class StreamKernel(Kernel):
    """A Kernel over a Box: executes cells, turns every failure into an ExecResult, and swaps in a
    fresh box (with the same task files) on the next execute after the old one died.

    A failure of the sandbox itself (no box could be started or loaded, the box vanished without its
    interpreter reporting a death: killed from outside, engine trouble) sets `ExecResult.sandbox_error`;
    the model's own failures (a Python error, a timeout, an interpreter its code crashed or ran out of
    memory) do not. A cell waits for one of the sandbox's run slots before its timeout starts."""

    def __init__(self, sandbox: PooledSandbox, images: list[str], videos: list[str]) -> None:
        self._sandbox = sandbox
        self._cfg = sandbox.cfg
        self._images = list(images)
        self._videos = list(videos)
        self._box: Box | None = None
        self._closed = False
        self._lock = threading.Lock()
        self.restarts = 0
        self._box = self._fresh_box()  # setup errors (bad files, no box) raise SandboxError here

    def _fresh_box(self, attempts: int = 2) -> Box:
        for attempt in range(attempts):
            box = self._sandbox.pool.take()
            try:
                imgs = box.taskdir.stage(self._images, "image")
                vids = box.taskdir.stage(self._videos, "video")
                with self._sandbox.run_slot():
                    reply = box.request(
                        {"op": "init", "images": imgs, "videos": vids}, time.monotonic() + 60.0
                    )
                if reply.get("error"):
                    raise SandboxError(f"{reply['error']} (images={self._images}, videos={self._videos})")
                return box
            except (SandboxError, KernelDied, KernelTimeout, OSError, ValueError) as e:
                self._sandbox.pool.discard(box)
                if isinstance(e, SandboxError):  # the task's files, not the box: no retry
                    raise
                if attempt + 1 == attempts:
                    raise SandboxError(
                        f"the sandbox kernel failed while loading the task files ({type(e).__name__}: "
                        f"{e or box.died_reason or box.death_reason()})"
                    ) from e
        raise AssertionError("unreachable")

    def execute(self, code: str, timeout_s: float | None = None) -> ExecResult:
        timeout = float(self._cfg.timeout_s if timeout_s is None else timeout_s)
        with self._lock:
            if self._closed:
                return ExecResult(error="The interpreter was closed.", sandbox_error=True)
            if self._box is None:
                try:
                    self._box = self._fresh_box()
                    self.restarts += 1
                except Exception as e:  # noqa: BLE001 - execute never raises
                    return ExecResult(error=f"The sandbox failed: the interpreter could not be restarted: {e}",
                                      sandbox_error=True)  # fmt: skip
            box = self._box
            with self._sandbox.run_slot():
                t0 = time.monotonic()  # the timeout counts from here: waiting for a run slot is not charged
                try:
                    reply = box.request({"op": "exec", "code": code}, t0 + timeout)
                except (KernelTimeout, KernelDied, OSError, ValueError, struct.error) as e:
                    timed_out = isinstance(e, KernelTimeout)
                    why = box.died_reason  # set when the zygote saw the interpreter itself die
                    infra = why is None and not timed_out
                    if infra:
                        why = box.death_reason()
                        infra = not why.startswith("out of memory")
                    self._sandbox.pool.discard(box)
                    self._box = None
                    what = (
                        f"Execution timed out after {timeout:g} s and the interpreter was stopped"
                        if timed_out
                        else f"The sandbox failed: its box died while running this cell ({why})"
                        if infra
                        else f"The interpreter died ({why})"
                    )
                    return ExecResult(
                        error=f"{what}; the next execution starts a fresh interpreter (variables defined "
                        "earlier are lost).",
                        timed_out=timed_out,
                        duration_s=time.monotonic() - t0,
                        sandbox_error=infra,
                    )
        return ExecResult(
            stdout=reply.get("stdout", ""),
            images=[base64.b64decode(s) for s in reply.get("images", [])],
            error=reply.get("error"),
            timed_out=False,
            duration_s=time.monotonic() - t0,
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._box is not None:
                box, self._box = self._box, None
                self._sandbox.release(box)


class PooledSandbox(Sandbox):
    """A Sandbox backed by a WarmPool of boxes; backends implement `_start_box()`."""

    def __init__(self, cfg: SandboxConfig) -> None:
        self.cfg = cfg
        self._check()
        # With reuse, boxes live + ready stay within max_kernels + warm_kernels: the number of boxes the
        # one-box-per-trajectory mode holds at full load, with no box started only to be killed.
        cap = cfg.max_kernels + cfg.warm_kernels if cfg.reuse_kernels else 0
        cpus = len(os.sched_getaffinity(0))
        self.pool = WarmPool(self._start_box, cfg.warm_kernels, self.name, max_boxes=cap,
                             max_starting=cfg.max_starting or cpus)  # fmt: skip
        self.reused = 0  # boxes cleaned and pooled again after a trajectory
        self.recycled = 0  # boxes killed at max_trajectories_per_box, or because cleaning failed
        # Run slots: cells (and task loads) running at once. More than the cores can serve would stretch
        # every cell's wall time until legitimate cells hit their timeout under a burst.
        self.max_running = cfg.max_running or 4 * cpus
        self._slots = threading.Condition()
        self._running = 0
        self.run_waiting = 0
        self.run_waits: deque[float] = deque(maxlen=10_000)

    @contextlib.contextmanager
    def run_slot(self) -> Iterator[None]:
        """Hold one of the `max_running` run slots (waiting, FIFO-ish, for a free one)."""
        t = time.monotonic()
        with self._slots:
            self.run_waiting += 1
            self._slots.wait_for(lambda: self._running < self.max_running)
            self.run_waiting -= 1
            self._running += 1
        self.run_waits.append(time.monotonic() - t)
        try:
            yield
        finally:
            with self._slots:
                self._running -= 1
                self._slots.notify()

    def _check(self) -> None:
        """Raise SandboxError when the backend cannot work here."""

    @abstractmethod
    def _start_box(self) -> Box:
        """Start one box running the kernel and wait until it reports ready."""

    def open(self, images: list[str] | None = None, videos: list[str] | None = None) -> Kernel:
        return StreamKernel(self, list(images or []), list(videos or []))

    def release(self, box: Box) -> None:
        """A trajectory is done with `box` (its last request was answered: a box that timed out or died
        never gets here). Without reuse, or after `max_trajectories_per_box` trajectories, the box is
        killed; otherwise the zygote cleans it, the task directory is emptied, and it is pooled again."""
        box.uses += 1
        if not self.cfg.reuse_kernels:
            self.pool.discard(box)
            return
        if box.uses >= self.cfg.max_trajectories_per_box or not box.zygote:
            self.recycled += 1
            self.pool.discard(box)
            return
        # Order matters: first no process of the old trajectory is left (it could otherwise still read
        # the task files), then the files go, then the box is handed out again.
        if box.end_trajectory() and box.taskdir.clear():
            self.reused += 1
            self.pool.give_back(box)
        else:
            self.recycled += 1
            self.pool.discard(box)

    def close(self) -> None:
        self.pool.close()
