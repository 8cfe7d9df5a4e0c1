"""Fixtures for the sandbox tests: one warm sandbox per backend and mode (fresh box per trajectory, or
reused boxes) per module; docker ones skip with a reason when no engine answers or the image is missing."""

from __future__ import annotations

import pytest
from sandbox_helpers import BACKEND_MODES, sandbox_cfg, skip_reason


@pytest.fixture(scope="module", params=BACKEND_MODES)
def sandbox(request):
    """A started sandbox of each backend and mode (module scope: the warm pool is shared by the module's
    tests; in reuse mode its boxes serve the module's trajectories one after another)."""
    backend, reuse = request.param
    reason = skip_reason(backend)
    if reason:
        pytest.skip(reason)
    from pyvision_rl.sandbox import make_sandbox

    sb = make_sandbox(sandbox_cfg(backend, reuse_kernels=reuse))
    yield sb
    sb.close()


@pytest.fixture(scope="session")
def test_image(tmp_path_factory):
    """A 200x100 RGB image: left half red, right half blue."""
    from PIL import Image

    p = tmp_path_factory.mktemp("img") / "clue.png"
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    img.paste((0, 0, 255), (100, 0, 200, 100))
    img.save(p)
    return str(p)


@pytest.fixture(scope="session")
def test_video(tmp_path_factory):
    """A 40-frame 64x48 video at 10 fps whose frame i is uniformly gray level 6*i (B-frames, GOP 8)."""
    import av
    import numpy as np

    p = tmp_path_factory.mktemp("vid") / "clue.mp4"
    with av.open(str(p), "w") as out:
        s = out.add_stream("libx264", rate=10, options={"g": "8", "bf": "2", "crf": "10"})
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(40):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 6 * i, np.uint8), format="rgb24")
            for pkt in s.encode(frame):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    return str(p)
