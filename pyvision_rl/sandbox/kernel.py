"""The in-box interpreter: a zygote that forks one fresh interpreter per trajectory.

Runs inside the sandbox (Docker container or bwrap process) with only the box's libraries, so it imports
nothing from pyvision_rl. It must work on Debian bookworm's stack (Python 3.11, numpy 1.24, matplotlib
3.6, Pillow 9.4, PyAV 10) and on the host venv's newer versions.

Process model. The box's long-lived process is a *zygote*: it imports numpy/PIL/matplotlib(Agg)/av once
(~0.6 CPU-s, the cost that dominates a fresh box) and never runs user code. An `init` request forks a
*trajectory child* (copy-on-write modules, pristine globals/environment/cwd, its own session, the
per-trajectory rlimits) that binds image_clue_i / video_clue_i and runs that trajectory's cells. The
zygote relays frames between the host and the child over a private pipe pair, so the host channel is
never in the hands of user code. `end` kills every process in the box except the zygote and PID 1 (a
/proc scan, since user code can setsid/double-fork), wipes the writable directories (/tmp, /dev/shm,
/var/tmp) and System V IPC objects, and only then answers, so the next `init` starts from a clean box.
If the child dies, the zygote reports {"op": "died"} and exits: a box whose trajectory crashed is not
reused. The host decides reuse (sandbox.reuse_kernels); without it each box serves one trajectory.

Wire protocol (host <-> zygote, over the zygote's stdin/stdout): frames of a 4-byte big-endian length
followed by that many bytes of UTF-8 JSON. Requests: {"op": "init", "images": [...], "videos": [...]},
{"op": "exec", "code": "..."} (both answered by the child), {"op": "end"} (answered by the zygote:
{"op": "clean", "ok": bool, ...}), {"op": "ping"}. Each request gets one reply frame. At start-up the
zygote sends {"op": "ready"} once its libraries are imported, so a warm box has paid the import cost.

Usage: python3 kernel.py '<json settings>'  (settings: max_stdout_bytes, max_images, max_pixels,
memory_bytes, nproc, fsize_bytes; the last three set rlimits on each trajectory child, 0 = leave as is).
"""

from __future__ import annotations

import base64
import ctypes
import gc
import io
import json
import linecache
import os
import resource
import select
import signal
import stat
import struct
import sys
import time
import traceback

# ---------------------------------------------------------------------------- settings and rlimits
SETTINGS = {
    "max_stdout_bytes": 8192,
    "max_images": 8,
    "max_pixels": 4_000_000,
    "max_aspect": 200.0,
    "memory_bytes": 0,
    "nproc": 0,
    "fsize_bytes": 0,
}


def _set_rlimits() -> None:
    # The process backend has no cgroups: rlimits are its memory/pids/file-size caps. In Docker they
    # are a second layer under the cgroup limits. Lowering a limit never needs privileges. Set in each
    # trajectory child, so that the limits count per trajectory (the zygote itself is unlimited).
    for name, key in (
        ("RLIMIT_AS", "memory_bytes"),
        ("RLIMIT_NPROC", "nproc"),
        ("RLIMIT_FSIZE", "fsize_bytes"),
    ):
        value = int(SETTINGS.get(key) or 0)
        if value > 0:
            try:
                resource.setrlimit(getattr(resource, name), (value, value))
            except (ValueError, OSError):
                pass
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass


# ---------------------------------------------------------------------------- the private channel
# The host channel, on private descriptors (main() moves it off fds 0/1: see there). In a trajectory child
# these two names are rebound to its pipe pair with the zygote.
_CHAN_IN = _CHAN_OUT = -1
_TMP = os.environ.get("TMPDIR") or "/tmp"
_FD_OUT = -1  # the child's raw fd-level output file (see _child_main)
# Directories user code can write to; wiped between trajectories (missing ones are skipped).
_WRITABLE = [_TMP, "/dev/shm", "/var/tmp"]


def _mounts_under(dirs: list[str]) -> set[str]:
    """Mount points inside the writable dirs (e.g. a read-only interpreter bound under /tmp by the
    process backend, when the project lives in /tmp): the wipe leaves them and their parents alone."""
    out: set[str] = set()
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].replace("\\040", " ")
                if any(mp.startswith(d.rstrip("/") + "/") for d in dirs):
                    out.add(mp)
    except OSError:
        pass
    return out


_KEEP = _mounts_under(_WRITABLE)
_KEEP_PARENTS: set[str] = set()
for _m in list(_KEEP):
    _d = os.path.dirname(_m)
    while _d not in ("/", "") and _d not in _WRITABLE:
        _KEEP_PARENTS.add(_d)
        _d = os.path.dirname(_d)
_PR_SET_DUMPABLE = 4
# The kernel's own references: user code may patch json/struct/base64/os module attributes in its
# trajectory (json.dumps = None) without breaking the channel that reports its results.
_dumps, _loads, _pack, _unpack, _b64encode = (
    json.dumps,
    json.loads,
    struct.pack,
    struct.unpack,
    base64.b64encode,
)
_os_read, _os_write, _getpid = os.read, os.write, os.getpid
_libc = ctypes.CDLL(None, use_errno=True)


def _read_frame(fd: int, idle=None) -> bytes | None:
    """One raw frame (header + body) from `fd`, or None at end of stream. With `idle`, it runs after each
    second spent waiting (the zygote reaps zombies there: orphans of user code are re-parented to it when
    it is PID 1, as in Docker); a trajectory child blocks (its waitpid would steal user code's children)."""
    buf, need = bytearray(), 4
    while len(buf) < need:
        if idle is not None and not select.select([fd], [], [], 1.0)[0]:
            idle()
            continue
        chunk = _os_read(fd, need - len(buf))
        if not chunk:
            return None
        buf += chunk
        if need == 4 == len(buf):
            need += _unpack(">I", bytes(buf))[0]
    return bytes(buf)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[_os_write(fd, view) :]


def _frame(msg: dict) -> bytes:
    data = _dumps(msg).encode("utf-8")
    return _pack(">I", len(data)) + data


def _recv() -> dict | None:
    raw = _read_frame(_CHAN_IN)
    return None if raw is None else _loads(raw[4:].decode("utf-8"))


def _send(msg: dict) -> None:
    _write_all(_CHAN_OUT, _frame(msg))


# ---------------------------------------------------------------------------- output capture
class _Capture(io.TextIOBase):
    """A text stream that keeps the first `limit` bytes and counts the rest (so a 100 MB flood is cheap)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.kept = 0
        self.dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        room = self.limit - self.kept
        if room > 0:
            piece = s[:room]
            n = len(piece.encode("utf-8", "replace"))
            self.parts.append(piece)
            self.kept += n
            self.dropped += len(s) - len(piece)
        else:
            self.dropped += len(s)
        return len(s)

    def flush(self) -> None:
        pass

    def add_raw(self, data: bytes) -> None:
        if data:
            self.write(data.decode("utf-8", "replace"))

    def text(self) -> str:
        out = "".join(self.parts)
        if len(out.encode("utf-8", "replace")) > self.limit:  # multibyte chars: trim to the byte budget
            out = out.encode("utf-8", "replace")[: self.limit].decode("utf-8", "ignore")
        if self.dropped:
            if out and not out.endswith("\n"):
                out += "\n"
            out += f"... [output truncated: {self.dropped} more characters not shown]\n"
        return out


def _drain_fd_output(cap: _Capture) -> None:
    try:
        size = os.lseek(_FD_OUT, 0, os.SEEK_END)
        if size:
            os.lseek(_FD_OUT, 0, os.SEEK_SET)
            cap.add_raw(os.read(_FD_OUT, min(size, cap.limit + 1)))
            if size > cap.limit + 1:
                cap.dropped += size - cap.limit - 1
            os.ftruncate(_FD_OUT, 0)
            os.lseek(_FD_OUT, 0, os.SEEK_SET)
    except OSError:
        pass


# ---------------------------------------------------------------------------- figures
_shown: list[bytes] = []
_notes: list[str] = []


def _show(*args, **kwargs) -> None:
    """plt.show(): render the current figure to PNG (within the pixel cap) and close it."""
    import matplotlib.pyplot as plt

    fig = plt.gcf()
    try:
        if len(_shown) >= int(SETTINGS["max_images"]):
            _notes.append(f"[figure not returned: at most {SETTINGS['max_images']} images per execution]")
            return
        w_in, h_in = fig.get_size_inches()
        dpi = float(fig.dpi)
        if w_in <= 0 or h_in <= 0:
            _notes.append("[figure not returned: it has zero size]")
            return
        aspect = max(w_in / h_in, h_in / w_in)
        if aspect >= float(SETTINGS["max_aspect"]):
            _notes.append(f"[figure not returned: aspect ratio {aspect:.0f} >= {SETTINGS['max_aspect']:.0f}]")
            return
        # Check size * dpi BEFORE rendering: Agg would allocate w*h*4 bytes (a 100000x100000 figure is
        # 40 TB). Oversized figures are rendered at a lower dpi so they fit the pixel cap.
        max_px = float(SETTINGS["max_pixels"])
        if w_in * h_in * dpi * dpi > max_px:
            dpi = (max_px / (w_in * h_in)) ** 0.5
            _notes.append(
                f"[figure downscaled to {int(w_in * dpi)}x{int(h_in * dpi)} pixels (cap {int(max_px)})]"
            )
            if w_in * dpi < 1 or h_in * dpi < 1:
                _notes.append("[figure not returned: too small after downscaling]")
                return
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        _shown.append(buf.getvalue())
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------- video reader (decord API)
class NDArray:
    """Minimal stand-in for decord.ndarray.NDArray: holds a numpy array, `.asnumpy()` returns it."""

    def __init__(self, array) -> None:
        self._a = array

    def asnumpy(self):
        return self._a

    @property
    def shape(self):
        return self._a.shape

    def __array__(self, dtype=None, copy=None):
        return self._a if dtype is None else self._a.astype(dtype)


def cpu(dev_id: int = 0) -> str:
    """decord.cpu() stand-in (the context is ignored: decoding is always on the CPU)."""
    return "cpu"


def gpu(dev_id: int = 0) -> str:
    return "cpu"


class VideoReader:
    """decord.VideoReader's API on PyAV: len(v), v.get_avg_fps(), v[i].asnumpy(), v.get_batch(idx).asnumpy().

    Frame-accurate: frame i is the i-th frame in presentation order. The packet timestamps are indexed
    once at open (demux only, no decoding); a read seeks to the nearest keyframe before the target and
    decodes forward to the exact timestamp, reusing the decoder position for forward reads.
    """

    def __init__(self, uri, ctx=None, width: int = -1, height: int = -1, num_threads: int = 0, **_: object):
        import av

        self._path = str(uri)
        self._size = (int(width), int(height))
        self._container = av.open(self._path)
        stream = self._container.streams.video[0]
        self._stream = stream
        self._tb = stream.time_base
        pts = []
        for packet in self._container.demux(stream):
            if packet.pts is not None and packet.size > 0:
                pts.append(packet.pts)
        pts.sort()
        self._pts = pts
        self._index = {p: i for i, p in enumerate(pts)}
        rate = stream.average_rate or stream.guessed_rate
        if rate:
            self._fps = float(rate)
        elif len(pts) > 1 and self._tb:
            self._fps = (len(pts) - 1) / float((pts[-1] - pts[0]) * self._tb)
        else:
            self._fps = 0.0
        self._iter = None  # decoder generator positioned after frame index self._pos
        self._pos = -1

    def __len__(self) -> int:
        return len(self._pts)

    def get_avg_fps(self) -> float:
        return self._fps

    def get_frame_timestamp(self, idx):
        import numpy as np

        idx = np.asarray(idx).reshape(-1)
        start = np.array([float((self._pts[i] - self._pts[0]) * self._tb) for i in idx])
        return np.stack([start, start + (1.0 / self._fps if self._fps else 0.0)], axis=1)

    def _norm(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += len(self._pts)
        if not 0 <= i < len(self._pts):
            raise IndexError(f"frame index {i} out of range for a video of {len(self._pts)} frames")
        return i

    def _to_array(self, frame):
        w, h = self._size
        if w > 0 and h > 0:
            return frame.to_ndarray(format="rgb24", width=w, height=h)
        return frame.to_ndarray(format="rgb24")

    def _frame(self, i: int):
        # Forward reads within the current GOP-ish window continue decoding; otherwise seek. When the first
        # pass misses the target (a seek past it: bad index), the second decodes from the start.
        for retry in (False, True):
            if retry or self._iter is None or i <= self._pos or i - self._pos > 64:
                target = 0 if retry else int(self._pts[i])
                self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
                self._iter = self._container.decode(self._stream)
                self._pos = -1
            for frame in self._iter:
                k = self._index.get(frame.pts)
                if k is None:
                    continue
                self._pos = k
                if k == i:
                    return self._to_array(frame)
                if k > i and not retry:
                    break
        raise IndexError(f"frame {i} could not be decoded from {self._path}")

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return self.get_batch(range(*idx.indices(len(self))))
        return NDArray(self._frame(self._norm(idx)))

    def get_batch(self, indices) -> NDArray:
        import numpy as np

        idx = [
            self._norm(i)
            for i in np.asarray(list(indices) if not hasattr(indices, "shape") else indices).reshape(-1)
        ]
        frames = {}
        for i in sorted(set(idx)):
            frames[i] = self._frame(i)
        if not idx:
            return NDArray(np.zeros((0, 0, 0, 3), dtype=np.uint8))
        return NDArray(np.stack([frames[i] for i in idx]))

    def seek(self, pos: int) -> None:
        self._pos = -1
        self._iter = None

    def __repr__(self) -> str:
        return f"VideoReader({self._path!r}, frames={len(self)}, fps={self._fps:.2f})"


# ---------------------------------------------------------------------------- execution
_MAIN_PID = os.getpid()
USER_GLOBALS: dict = {"__name__": "__main__", "__builtins__": __builtins__}
_cell_no = 0


def _preload() -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    seed, conf = os.environ.get("PYVISION_MPL_SEED"), os.environ.get("MPLCONFIGDIR")
    if seed and conf and os.path.isdir(seed):  # a font cache built at image build time (saves ~1 s)
        try:
            import shutil

            os.makedirs(conf, exist_ok=True)
            for name in os.listdir(seed):
                shutil.copy(os.path.join(seed, name), os.path.join(conf, name))
        except OSError:
            pass
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import PIL
    import PIL.Image

    plt.show = _show
    USER_GLOBALS.update(
        {
            "np": np,
            "numpy": np,
            "plt": plt,
            "matplotlib": matplotlib,
            "PIL": PIL,
            "Image": PIL.Image,
            "io": io,
            "base64": base64,
            "os": os,
            "VideoReader": VideoReader,
            "cpu": cpu,
            "gpu": gpu,
        }
    )


def _user_traceback(exc: BaseException, filename_prefix: str) -> str:
    """The traceback of the user's cell only: frames of the kernel itself are dropped."""
    if isinstance(exc, SyntaxError):
        return "".join(traceback.format_exception_only(type(exc), exc)).rstrip()
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(filename_prefix)]
    lines = ["Traceback (most recent call last):\n"] if frames else []
    lines += traceback.format_list(frames[-8:])
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines).rstrip()


def _exec(code: str) -> dict:
    global _cell_no
    _cell_no += 1
    name = f"<cell-{_cell_no}>"
    cap = _Capture(int(SETTINGS["max_stdout_bytes"]))
    _shown.clear()
    _notes.clear()
    error = None
    old = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = cap
    t0 = time.perf_counter()
    try:
        linecache.cache[name] = (len(code), None, code.splitlines(True), name)
        compiled = compile(code, name, "exec")
        exec(compiled, USER_GLOBALS)
    except BaseException as e:  # noqa: BLE001 - SystemExit/KeyboardInterrupt from user code are errors too
        error = _user_traceback(e, "<cell-")
    finally:
        if _getpid() != _MAIN_PID:
            # A process the user's code forked has finished the cell: it must never answer on the
            # channel (the host would read two replies), so it leaves here.
            os._exit(0)
        sys.stdout, sys.stderr = old
    _drain_fd_output(cap)
    for note in _notes:
        cap.write(note + "\n")
    return {
        "stdout": cap.text(),
        "images": [_b64encode(p).decode("ascii") for p in _shown],
        "error": error,
        "duration_s": time.perf_counter() - t0,
    }


def _init(images: list, videos: list) -> dict:
    import PIL.Image

    try:
        for i, path in enumerate(images):
            img = PIL.Image.open(path)
            img.load()
            USER_GLOBALS[f"image_clue_{i}"] = img
        for i, path in enumerate(videos):
            USER_GLOBALS[f"video_clue_{i}"] = VideoReader(path)
    except Exception as e:  # noqa: BLE001 - reported to the host as a setup error
        return {"error": f"could not load task file: {type(e).__name__}: {e}"}
    return {"error": None}


def _serve() -> None:
    """The request loop of a trajectory child over its pipe pair: the zygote relays it init, then exec."""
    while (msg := _recv()) is not None:
        reply = (
            _exec(msg.get("code", ""))
            if msg.get("op") == "exec"
            else _init(msg.get("images", []), msg.get("videos", []))
        )
        try:
            _send(reply)
        except BrokenPipeError:
            return


def _child_main(chan_in: int, chan_out: int) -> None:
    """In a freshly forked trajectory child: own session, own channel, own output file, rlimits."""
    global _CHAN_IN, _CHAN_OUT, _FD_OUT, _MAIN_PID
    os.setsid()
    _MAIN_PID = os.getpid()
    _CHAN_IN, _CHAN_OUT = chan_in, chan_out
    try:
        _libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)  # an ordinary process again (the zygote is not)
    except (AttributeError, OSError):
        pass
    try:
        os.chdir(_TMP)
    except OSError:
        pass
    try:
        # Raw fd-level output of user code (subprocesses, os.write) lands here and is appended to stdout.
        _FD_OUT = os.open(os.path.join(_TMP, ".kernel-fd-output"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError:
        _FD_OUT = os.open(os.devnull, os.O_RDWR)
    os.dup2(_FD_OUT, 1)
    os.dup2(_FD_OUT, 2)
    _set_rlimits()
    _serve()


# ---------------------------------------------------------------------------- the zygote
_reaped: dict[int, int] = {}  # pid -> wait status of reaped direct children we still care about


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _reaped[pid] = status


def _status_text(status: int | None) -> str:
    if status is None:
        return "the interpreter closed its channel"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        if sig == signal.SIGKILL:
            return f"killed by signal {name} (e.g. the memory limit)"
        if sig == signal.SIGSEGV:
            return f"killed by signal {name} (segmentation fault)"
        return f"killed by signal {name}"
    return f"exit status {os.WEXITSTATUS(status)}"


def _wait_child(pid: int, timeout_s: float = 2.0) -> int | None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        _reap()
        if pid in _reaped:
            return _reaped.pop(pid)
        time.sleep(0.005)
    return None


def _other_pids() -> list[int]:
    """Live (non-zombie) processes in the box other than the zygote and PID 1."""
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid in (1, me):
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                st = f.read()
            state = st[st.rindex(b")") + 2 : st.rindex(b")") + 3]
        except (OSError, ValueError):
            continue  # gone already
        if state not in (b"Z", b"X"):
            out.append(pid)
    return out


def _kill_all(timeout_s: float = 5.0) -> bool:
    """SIGKILL every process in the box but the zygote and PID 1, until none is left (True) or the time
    is up (False). kill(-1) reaches processes that left our session/group; the /proc scan checks it."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            os.kill(-1, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in _other_pids():  # belt and braces: anything kill(-1) may not have reached
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _reap()
        if not _other_pids():
            _reap()
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.002)


def _rm(path: str) -> bool:
    """Remove `path` (a tree) even where user code removed permissions; True when it is gone (or is one
    of the box's own mounts, or leads to one, which stay)."""
    if path in _KEEP:
        return True
    if path in _KEEP_PARENTS:
        try:
            return all([_rm(os.path.join(path, name)) for name in os.listdir(path)])
        except OSError:
            return False
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if stat.S_ISDIR(st.st_mode):
        try:
            os.chmod(path, 0o700)
        except OSError:
            pass
        ok = True
        try:
            for name in os.listdir(path):
                ok &= _rm(os.path.join(path, name))
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError:
            ok = False
        return ok
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _wipe() -> list[str]:
    """Empty the writable directories and remove System V IPC objects; returns what could not be removed."""
    left = []
    for d in _WRITABLE:
        if not os.path.isdir(d) or not os.access(d, os.W_OK):
            continue
        try:
            names = os.listdir(d)
        except OSError:
            left.append(d)
            continue
        for name in names:
            if not _rm(os.path.join(d, name)):
                left.append(os.path.join(d, name))
    # Shared memory segments, message queues and semaphores outlive their creators (the box has its
    # own IPC namespace, so all of them are the previous trajectory's).
    for kind, call in (("shm", "shmctl"), ("msg", "msgctl"), ("sem", "semctl")):
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            ident = int(row.split()[1])
            fn = getattr(_libc, call)
            rc = fn(ident, 0, 0) if kind == "sem" else fn(ident, 0, None)  # IPC_RMID = 0
            if rc != 0:
                left.append(f"sysv-{kind}:{ident}")
    return left


_child: tuple[int, int, int] | None = None  # (pid, to_child_w, from_child_r) of the running trajectory


def _close_child() -> None:
    global _child
    for fd in _child[1:] if _child else ():
        try:
            os.close(fd)
        except OSError:
            pass
    _child = None


def _fork_child() -> None:
    global _child
    c_in_r, c_in_w = os.pipe()  # zygote -> child
    c_out_r, c_out_w = os.pipe()  # child -> zygote
    pid = os.fork()
    if pid == 0:
        try:
            for fd in (_CHAN_IN, _CHAN_OUT, c_in_w, c_out_r):
                os.close(fd)
            _child_main(c_in_r, c_out_w)
        finally:
            os._exit(0)
    os.close(c_in_r)
    os.close(c_out_w)
    _child = (pid, c_in_w, c_out_r)


def _relay(raw: bytes) -> bytes | dict:
    """A request for the trajectory child: its reply frame, as is. If the child died, the zygote reports
    {"op": "died"} and exits: a box whose trajectory crashed is not reused."""
    if _child is None:
        return {"error": "no trajectory is running in this box (send init first)"}
    pid, to_child, from_child = _child
    try:
        _write_all(to_child, raw)
        reply = _read_frame(from_child, _reap)
    except OSError:
        reply = None
    if reply is None:
        _send({"op": "died", "reason": _status_text(_wait_child(pid))})
        _close_child()
        _kill_all(2.0)
        sys.exit(1)
    return reply


def _on_init(raw: bytes) -> bytes | dict:
    if _child is not None:
        return {"error": "a trajectory is already running in this box (send end first)"}
    _fork_child()
    return _relay(raw)


def _on_end(raw: bytes) -> dict:
    _close_child()
    killed = _kill_all()
    _reaped.clear()
    left = _wipe()
    return {"op": "clean", "ok": killed and not left, "left": left[:20], "procs_left": _other_pids()[:20]}


_ZYGOTE_OPS = {
    "ping": lambda raw: {"op": "pong", "busy": _child is not None},
    "end": _on_end,
    "init": _on_init,
    "exec": _relay,
}


def _zygote() -> None:
    """Serve trajectories one at a time, forking a fresh child for each (see the module docstring)."""
    while (raw := _read_frame(_CHAN_IN, _reap)) is not None:
        op = json.loads(raw[4:].decode("utf-8")).get("op")
        handler = _ZYGOTE_OPS.get(op)
        reply = handler(raw) if handler else {"error": f"unknown op {op!r}"}
        _write_all(_CHAN_OUT, reply if isinstance(reply, bytes) else _frame(reply))
    _kill_all(2.0)  # the host went away: leave nothing behind


def main() -> None:
    global _CHAN_IN, _CHAN_OUT
    if len(sys.argv) > 1:
        SETTINGS.update(json.loads(sys.argv[1]))
    # Keep the host channel on private descriptors, then point fds 0/1/2 elsewhere so that nothing the
    # user's code does (os.write(1, ...), subprocesses, C libraries) can corrupt the protocol stream.
    _CHAN_IN, _CHAN_OUT = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # library start-up noise of the zygote goes nowhere
        os.dup2(devnull, fd)
    os.close(devnull)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - lives for the life of the process
    _preload()
    # Every trajectory starts from the same /tmp (the first one too): drop start-up leftovers (font
    # caches written while importing) that later trajectories would not see after a wipe.
    _wipe()
    # Objects imported so far live for the zygote's whole life: keep them out of the collector, so a
    # collection in a trajectory child does not write to (and so copy) every page of numpy/matplotlib.
    gc.freeze()
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        # Not dumpable: processes of the same uid (user code) cannot ptrace the zygote or open its
        # /proc/<pid>/mem and fds, so nothing a trajectory does can change what the next one forks from.
        _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (AttributeError, OSError):
        pass
    _send({"op": "ready", "pid": os.getpid(), "python": sys.version.split()[0], "zygote": True})
    try:
        _zygote()
    except BrokenPipeError:
        _kill_all(2.0)


if __name__ == "__main__":
    main()
