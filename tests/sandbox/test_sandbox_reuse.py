"""Fork-server mode (sandbox.reuse_kernels=true), both backends: a box serves trajectory after trajectory,
and trajectory B in the same box sees nothing that trajectory A left (files, processes, patched modules,
environment, cwd, globals, IPC objects, task files); a timeout or crash discards the box; a box is
replaced after max_trajectories_per_box trajectories."""

from __future__ import annotations

import pytest
from sandbox_helpers import BACKENDS, sandbox_cfg, skip_reason

from pyvision_rl.sandbox import make_sandbox

# Trajectory A does everything it can to leave a trace for the next trajectory in its box.
POLLUTE = r"""
import json, os, subprocess, sys, time
open('/tmp/a_was_here', 'w').write('secret')
os.makedirs('/tmp/a_dir/sub', exist_ok=True)
open('/tmp/a_dir/sub/f', 'w').write('x')
os.chmod('/tmp/a_dir/sub', 0)  # even a directory A made unreadable must go
if os.access('/dev/shm', os.W_OK):
    open('/dev/shm/a_shm', 'w').write('x')
# A sleeper that leaves A's session and process group (setsid + double fork) and its parent.
subprocess.Popen(['/bin/sh', '-c', "setsid sh -c 'sleep 1000 & echo $! > /tmp/sleeper.pid' &"])
for _ in range(100):
    if os.path.exists('/tmp/sleeper.pid') and open('/tmp/sleeper.pid').read().strip():
        break
    time.sleep(0.02)
sleeper = int(open('/tmp/sleeper.pid').read())
import ctypes
libc = ctypes.CDLL(None)
shmid = libc.shmget(0x5EC7, 4096, 0o1666)  # IPC_CREAT | 0666: a System V segment outlives its creator
np.pi = 3
json.dumps = None
sys.modules['os'].sep = '#'
os.environ['A_SECRET'] = 'leak'
os.chdir('/task')
leaked_global = 1
print(sleeper, shmid, sorted(os.listdir('/task')))
"""

INSPECT = r"""
import json, os, sys
me, zygote = os.getpid(), os.getppid()
others = []
for p in os.listdir('/proc'):
    if p.isdigit() and int(p) not in (1, me, zygote):
        try:
            others.append(open(f'/proc/{p}/cmdline', 'rb').read().replace(b'\0', b' ').decode())
        except OSError:
            pass
print(json.JSONEncoder().encode({  # json.dumps may be patched (in A)
    'tmp': sorted(os.listdir('/tmp')),
    'shm': sorted(os.listdir('/dev/shm')) if os.path.isdir('/dev/shm') else [],
    'others': others,
    'sysv_shm': open('/proc/sysvipc/shm').read().splitlines()[1:],
    'pi': float(np.pi),
    'dumps_ok': callable(json.dumps) and json.dumps([1]) == '[1]',
    'sep': os.sep,
    'env': os.environ.get('A_SECRET'),
    'cwd': os.getcwd(),
    'leaked_global': 'leaked_global' in globals(),
    'task': sorted(os.listdir('/task')),
}))
"""


@pytest.fixture(scope="module", params=BACKENDS)
def reuse_sandbox(request):
    """One warm box and reuse on: a trajectory opened after a clean close gets the box just released."""
    reason = skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    sb = make_sandbox(
        sandbox_cfg(request.param, warm_kernels=1, reuse_kernels=True, max_trajectories_per_box=3)
    )
    yield sb
    sb.close()


def test_next_trajectory_in_the_same_box_sees_nothing_of_the_previous(reuse_sandbox, test_image, test_video):
    import json

    a = reuse_sandbox.open([test_image])
    box = a._box
    r = a.execute(POLLUTE, timeout_s=10)
    assert r.ok, r
    sleeper, shmid, a_task = r.stdout.split(" ", 2)
    assert int(shmid) >= 0 and "clue.png" in a_task
    seen_by_a = json.loads(a.execute(INSPECT).stdout)
    assert "a_was_here" in seen_by_a["tmp"] and seen_by_a["pi"] == 3 and seen_by_a["env"] == "leak"
    assert any("sleep 1000" in c for c in seen_by_a["others"]) and seen_by_a["sysv_shm"]
    a.close()

    b = reuse_sandbox.open([], [test_video])
    assert b._box is box and box.uses == 1  # really the same box, second trajectory
    r = b.execute(INSPECT)
    assert r.ok, r
    seen = json.loads(r.stdout)
    # B's own raw-output file only (plus, for the process backend, the read-only interpreter bind when the
    # project itself lives under /tmp, as in a CI clone there).
    own = {r.split("/")[2] for r in getattr(reuse_sandbox, "_roots", []) if r.startswith("/tmp/")}
    assert sorted(set(seen["tmp"]) - own) == [".kernel-fd-output"], seen
    assert seen["shm"] == [] and seen["sysv_shm"] == []
    assert seen["others"] == [], seen  # the escaped sleeper is gone
    assert seen["pi"] == pytest.approx(3.141592653589793) and seen["dumps_ok"] and seen["sep"] == "/"
    assert seen["env"] is None and seen["cwd"] == "/tmp" and not seen["leaked_global"]
    # A's task file is gone: only B's video is staged, and A's path does not resolve.
    assert len(seen["task"]) == 1 and seen["task"][0].endswith("clue.mp4"), seen["task"]
    a_path = "/task/" + json.loads(a_task.replace("'", '"'))[0]
    r = b.execute(f"print(os.path.exists({a_path!r}), 'image_clue_0' in globals(), len(video_clue_0))")
    assert r.stdout == "False False 40\n", r
    b.close()


def test_timeout_or_crash_discards_the_box(reuse_sandbox):
    for attack, timed_out in (("while True: pass", True), ("os._exit(3)", False)):
        k = reuse_sandbox.open()
        box = k._box
        assert k.execute("print(1)").stdout == "1\n"
        r = k.execute(attack, timeout_s=1.0)
        assert r.timed_out == timed_out and r.error
        if not timed_out:
            assert "exit status 3" in r.error
        k.close()
        k2 = reuse_sandbox.open()
        assert k2._box is not box  # the box was killed, not pooled again
        assert k2.execute("print(2)").stdout == "2\n"
        k2.close()


def test_box_is_replaced_after_max_trajectories(reuse_sandbox):
    k = reuse_sandbox.open()
    box = k._box
    k.close()
    for _ in range(3):  # max_trajectories_per_box=3: the box serves at most 3 trajectories, then goes
        k = reuse_sandbox.open()
        if k._box is not box:
            break
        assert k.execute("print(1)").stdout == "1\n"
        k.close()
    k.close()
    assert k._box is None and box.uses == 3 and reuse_sandbox.recycled >= 1


def test_pids_of_the_previous_trajectory_are_not_reused_while_alive(reuse_sandbox):
    """A sleeper A leaves is killed before B starts, even with B racing right behind it."""
    for _ in range(3):
        a = reuse_sandbox.open()
        r = a.execute("import subprocess\np = subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
                      "print(p.pid)")  # fmt: skip
        assert r.ok, r
        a.close()
        b = reuse_sandbox.open()
        r = b.execute(f"print(os.path.exists('/proc/{int(r.stdout)}/cmdline') and "
                      f"b'sleep' in open('/proc/{int(r.stdout)}/cmdline', 'rb').read())")  # fmt: skip
        assert r.stdout == "False\n", r
        b.close()


def test_kernel_pool_metrics_count_reused_boxes(reuse_sandbox):
    from pyvision_rl.sandbox.pool import KernelPool

    pool = KernelPool(reuse_sandbox.cfg, sandbox=reuse_sandbox)  # shares the module's sandbox (no shutdown)
    m0 = pool.metrics()
    for i in range(2):
        pool.open(f"t{i}")
        assert pool.execute(f"t{i}", f"print({i})").stdout == f"{i}\n"
        pool.close(f"t{i}")
    m1 = pool.metrics()
    # Each clean close either pools the box again or, at max_trajectories_per_box, replaces it.
    done = lambda m: m["sandbox/boxes_reused"] + m["sandbox/boxes_recycled"]  # noqa: E731
    assert done(m1) - done(m0) == 2 and m1["sandbox/boxes_reused"] > m0["sandbox/boxes_reused"]
