"""`pyvision-rl make-data` (a synthetic dataset: media + train.jsonl + eval.jsonl) and `pyvision-rl data
convert` (the released PyVision-RL data layout -> plain JSONL with absolute media paths)."""

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


def _convert(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from pyvision_rl.data import load_tasks

    stats: dict = {}
    tasks = load_tasks(
        args.input,
        skip_bad=args.skip_bad,
        stats=stats,
        media_root=args.image_root,
        strip_prefix=args.strip_prefix,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for t in tasks:
            row = {"id": t.id, "question": t.question, "answer": t.answer, "data_source": t.data_source}
            if t.images:
                row["image_path"] = [str(Path(p).resolve()) for p in t.images]
            if t.videos:
                row["video_path"] = [str(Path(p).resolve()) for p in t.videos]
            extra = {k: v for k, v in t.extra.items() if k not in ("image_sizes", "video_info", "source")}
            row["extra"] = {**extra, "converted_from": t.extra.get("source", "")}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    n = len(load_tasks(out))  # what we wrote is what training reads
    skipped = f"; skipped {stats['skipped']} bad rows: {stats['reasons']}" if stats.get("skipped") else ""
    print(f"wrote {n} tasks to {out}{skipped}")
    return 0


def register(subparsers) -> None:
    """Add `make-data` and `data convert` to the `pyvision-rl` command."""
    p = subparsers.add_parser("data", help="convert datasets (the released PyVision-RL layout) to task JSONL")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    c = sub.add_parser(
        "convert",
        help="PyVision-RL rows (RL json with mm_hint, or *_val_dataset.json) -> JSONL with absolute media paths",
        description="Read the released PyVision-RL data (RL rows with prompt/reward_model/extra_info/mm_hint, "
        "or raw validation rows with id/question/answer/data_source/image_path|video_path) with the same "
        "row/field checks as training, resolve media against --image-root, and write plain JSONL rows.",
    )
    c.add_argument("input", help="a PyVision-RL .json / .jsonl / .parquet file")
    c.add_argument("--out", required=True, help="output JSONL")
    c.add_argument(
        "--image-root",
        default=None,
        help="directory relative image/video paths resolve against (default: the input file's directory)",
    )
    c.add_argument(
        "--strip-prefix",
        default="",
        help="absolute path prefix written on another machine (e.g. "
        "/mnt/data/); paths starting with it resolve against --image-root instead",
    )
    c.add_argument("--skip-bad", action="store_true", help="skip and count bad rows instead of stopping")
    c.set_defaults(func=_convert)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    p = subparsers.add_parser(
        "make-data",
        help="write a synthetic task dataset (images/videos + train.jsonl + eval.jsonl)",
        description="Write synthetic tasks with ground truth: color_count (the demo task), small_objects "
        "(tiny objects on a large canvas), video_event (an mp4 with an event at a given frame), video_moment (the video demo's long clips: "
        "when does a square appear) or mixed (the first three, round-robin).",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--kind",
        choices=["color_count", "small_objects", "video_event", "video_moment", "mixed"],
        default="color_count",
    )
    p.add_argument("--n-train", type=int, default=512, help="training tasks")
    p.add_argument("--n-eval", type=int, default=64, help="held-out tasks")
    p.add_argument("--seed", type=int, default=1234, help="generator seed (same seed -> same files)")
    p.set_defaults(func=_make_data)
