"""Video files with PyAV: probe, write (frame-accurate mp4), and the sandbox's decord-compatible reader."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from pyvision_rl.sandbox.kernel import VideoReader  # noqa: F401 - host-side code decodes as the box does


@dataclass(frozen=True)
class VideoInfo:
    """Size, length and frame rate of a video file."""

    width: int
    height: int
    n_frames: int
    fps: float


def probe_video(path: str | Path) -> VideoInfo:
    """Read a video's size, frame count and average fps with PyAV.

    Containers that do not record the frame count are decoded once to count frames.
    Raises the PyAV/OS error if the file cannot be opened or has no video stream.
    """
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        rate = stream.average_rate or stream.guessed_rate or 0
        n = int(stream.frames or 0)
        if n <= 0:
            n = sum(1 for _ in container.decode(stream))
    return VideoInfo(width=width, height=height, n_frames=n, fps=float(rate))


def write_video(path: str | Path, frames: np.ndarray, fps: int | float) -> Path:
    """Encode `frames` (T, H, W, 3) uint8 RGB as an mp4 whose i-th decoded frame is frames[i].

    Uses libx264 (near-lossless, no B-frames, so every frame comes back in order), else mpeg4.
    H and W must be even (yuv420p).
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"frame size {w}x{h} must be even for yuv420p")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1000)
    with av.open(str(path), mode="w") as container:
        try:
            stream = container.add_stream("libx264", rate=rate)
            stream.options = {"crf": "10", "bf": "0", "g": "12"}
        except Exception:  # an FFmpeg build without x264
            stream = container.add_stream("mpeg4", rate=rate)
            stream.bit_rate = 4_000_000
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.time_base = Fraction(1) / rate
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1) / rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_frames(path: str | Path) -> np.ndarray:
    """All frames of a video as a (T, H, W, 3) uint8 RGB array, in decode order."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
