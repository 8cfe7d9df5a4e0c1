"""`pyvision-rl make-data`: write a synthetic dataset (media + train.jsonl + eval.jsonl)."""

from __future__ import annotations

import argparse


def _make_data(args: argparse.Namespace) -> int:
    from pyvision_rl.data import load_tasks
    from pyvision_rl.data.synthetic import make_dataset

    train, held_out = make_dataset(args.out, args.kind, args.n_train, args.n_eval, args.seed)
    # read back through the loader: what we wrote is what training will read
    n_train, n_eval = len(load_tasks(train)), len(load_tasks(held_out))
    print(f"wrote {n_train} training tasks to {train} and {n_eval} held-out tasks to {held_out}")
    return 0


def register(subparsers) -> None:
    """Add `make-data` to the `pyvision-rl` command."""
    p = subparsers.add_parser(
        "make-data",
        help="write a synthetic task dataset (images/videos + train.jsonl + eval.jsonl)",
        description="Write synthetic tasks with ground truth: color_count (the demo task), small_objects "
        "(tiny objects on a large canvas), video_event (an mp4 with an event at a given frame) or mixed.",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--kind", choices=["color_count", "small_objects", "video_event", "mixed"], default="color_count"
    )
    p.add_argument("--n-train", type=int, default=512, help="training tasks")
    p.add_argument("--n-eval", type=int, default=64, help="held-out tasks")
    p.add_argument("--seed", type=int, default=1234, help="generator seed (same seed -> same files)")
    p.set_defaults(func=_make_data)
