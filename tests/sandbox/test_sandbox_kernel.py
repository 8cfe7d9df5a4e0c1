"""Interpreter semantics on both backends: persistent globals, PyVision-style cells, figures, output
truncation, tracebacks, video reader frame accuracy, task-file errors."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pyvision_rl.sandbox.base import SandboxError

PYVISION_CELL = """
w, h = image_clue_0.size
crop = image_clue_0.crop((w // 2, 0, w, h))
plt.figure(figsize=(4, 2))
plt.imshow(crop)
plt.axis('off')
plt.show()
r, g, b = np.asarray(crop).reshape(-1, 3).mean(0)
print(f"right half mean RGB: {r:.0f} {g:.0f} {b:.0f}")
plt.figure()
plt.imshow(np.asarray(image_clue_0)[:, : w // 2])
plt.title('left half')
plt.show()
"""


def test_persistent_globals(sandbox):
    with sandbox.open() as k:
        assert k.execute("x = 20\ndef f(y):\n    return x + y").ok
        r = k.execute("print(f(22))")
        assert r.ok and r.stdout == "42\n"


def test_pyvision_style_cell_returns_text_and_two_images(sandbox, test_image):
    with sandbox.open([test_image]) as k:
        r = k.execute(PYVISION_CELL)
    assert r.ok, r.error
    assert r.stdout == "right half mean RGB: 0 0 255\n"
    assert len(r.images) == 2
    sizes = [Image.open(io.BytesIO(p)).size for p in r.images]
    assert sizes == [(400, 200), (640, 480)]
    assert all(p.startswith(b"\x89PNG") for p in r.images)


def test_show_closes_figure_and_caps_images(sandbox):
    with sandbox.open() as k:
        r = k.execute("for i in range(6):\n    plt.plot([i]); plt.show()\nprint(len(plt.get_fignums()))")
    assert r.ok and len(r.images) == 4  # sandbox_cfg: max_images_per_exec=4
    assert r.stdout.startswith("0\n") and "at most 4 images" in r.stdout


def test_traceback_shows_user_code_only(sandbox):
    with sandbox.open() as k:
        r = k.execute("def g():\n    return 1 / 0\nprint('before')\ng()")
    assert r.stdout == "before\n"
    assert r.error.startswith("Traceback (most recent call last):")
    assert "return 1 / 0" in r.error and r.error.endswith("ZeroDivisionError: division by zero")
    assert "kernel.py" not in r.error
    with sandbox.open() as k:
        r = k.execute("def (:")
    assert "SyntaxError" in r.error and "kernel.py" not in r.error


def test_stdout_truncation_marker_and_stderr(sandbox):
    with sandbox.open() as k:
        r = k.execute("import sys\nprint('a' * 5000)\nprint('to-stderr', file=sys.stderr)")
        assert r.ok
        assert r.stdout.startswith("a" * 2048)
        assert "[output truncated: " in r.stdout and "not shown]" in r.stdout
        r = k.execute("import sys\nprint('out'); print('err', file=sys.stderr); os.system('echo from-shell')")
        assert "out\nerr\n" in r.stdout


def test_video_reader_is_frame_accurate(sandbox, test_video):
    code = """
v = video_clue_0
print(len(v), round(v.get_avg_fps(), 2), v[0].asnumpy().shape)
idx = [39, 0, 17, 18, 5, 33, 8]
b = v.get_batch(idx).asnumpy()
print(b.shape, [int(round(b[i].mean() / 6)) for i in range(len(idx))])
print([int(round(v[i].asnumpy().mean() / 6)) for i in range(40)] == list(range(40)))
"""
    with sandbox.open([], [test_video]) as k:
        r = k.execute(code, timeout_s=20)
    assert r.ok, r.error
    lines = r.stdout.splitlines()
    assert lines[0] == "40 10.0 (48, 64, 3)"
    assert lines[1] == "(7, 48, 64, 3) [39, 0, 17, 18, 5, 33, 8]"
    assert lines[2] == "True"


def test_task_files_are_read_only_and_missing_file_is_a_setup_error(sandbox, test_image):
    with sandbox.open([test_image]) as k:
        r = k.execute("import glob\np = glob.glob('/task/*')[0]\nopen(p, 'a').write('x')")
        assert r.error and ("Read-only" in r.error or "Permission" in r.error)
    with pytest.raises(SandboxError, match="does not exist"):
        sandbox.open(["/nonexistent/image.png"])


def test_closed_kernel_reports_error(sandbox):
    k = sandbox.open()
    k.close()
    r = k.execute("print(1)")
    assert r.error and "closed" in r.error
