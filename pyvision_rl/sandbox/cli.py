"""`pyvision-rl sandbox run FILE.py [--image PATH]... [--video PATH]... [--backend B] [--timeout S]
[--save-images DIR]`: run a file as one cell in a fresh kernel and print the result as JSON."""

from __future__ import annotations

import argparse
import json
import os
import struct


def _png_size(png: bytes) -> list[int]:
    if png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) >= 24:
        w, h = struct.unpack(">II", png[16:24])
        return [w, h]
    return [0, 0]


def _run(args: argparse.Namespace) -> int:
    from pyvision_rl.config import SandboxConfig
    from pyvision_rl.sandbox import make_sandbox

    with open(args.file, encoding="utf-8") as f:
        code = f.read()
    cfg = SandboxConfig(backend=args.backend, warm_kernels=0, timeout_s=args.timeout, image=args.docker_image)
    with make_sandbox(cfg) as sandbox, sandbox.open(args.image, args.video) as kernel:
        res = kernel.execute(code)
        backend = sandbox.name
    out = {
        "backend": backend,
        "stdout": res.stdout,
        "error": res.error,
        "timed_out": res.timed_out,
        "duration_s": round(res.duration_s, 4),
        "n_images": len(res.images),
        "image_sizes": [_png_size(p) for p in res.images],
    }
    if args.save_images:
        os.makedirs(args.save_images, exist_ok=True)
        out["saved"] = []
        for i, png in enumerate(res.images):
            path = os.path.join(args.save_images, f"image_{i}.png")
            with open(path, "wb") as f:
                f.write(png)
            out["saved"].append(path)
    print(json.dumps(out, indent=2))
    return 0 if res.ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `sandbox run`."""
    p = subparsers.add_parser("sandbox", help="Run code in the sandbox (debug tool code).")
    sub = p.add_subparsers(dest="sandbox_command", metavar="ACTION")
    r = sub.add_parser("run", help="Run FILE.py as one cell in a fresh kernel; print the result as JSON.")
    r.add_argument("file", help="Python file to run as one cell.")
    r.add_argument(
        "--image", action="append", default=[], help="Input image, bound as image_clue_i (repeatable)."
    )
    r.add_argument(
        "--video", action="append", default=[], help="Input video, bound as video_clue_i (repeatable)."
    )
    r.add_argument(
        "--backend", choices=["auto", "docker", "process"], default="auto", help="Sandbox backend."
    )
    r.add_argument("--timeout", type=float, default=30.0, help="Execution timeout in seconds.")
    r.add_argument("--docker-image", default="pyvision-sandbox:latest", help="Docker image (docker backend).")
    r.add_argument("--save-images", metavar="DIR", help="Write the returned PNGs to DIR.")
    r.set_defaults(func=_run)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
