"""`pyvision-rl train | eval | sft | demo`: the main jobs."""

from __future__ import annotations

import argparse
import json
import logging


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def _cfg(args):
    from pyvision_rl.config import load_config

    return load_config(args.config, args.overrides)


def _train(args) -> int:
    _setup_logging()
    from pyvision_rl.trainer import train

    cfg = _cfg(args)
    last = train(cfg)
    print(json.dumps({k: v for k, v in last.items() if isinstance(v, int | float)}, indent=1))
    print(f"run directory: {cfg.run_dir()}")
    return 0


def _eval(args) -> int:
    _setup_logging()
    import yaml

    from pyvision_rl.config import load_config, parse_overrides
    from pyvision_rl.evaluate import evaluate_checkpoint

    cfg = load_config(args.config, args.overrides)
    explicit = _dotted(parse_overrides(args.overrides))
    if args.config:
        explicit |= _dotted(yaml.safe_load(open(args.config)) or {})
    res = evaluate_checkpoint(cfg, args.checkpoint, args.data, out=args.out, explicit=explicit)
    print(json.dumps(res, indent=1))
    return 0


def _dotted(tree: dict, prefix: str = "") -> set[str]:
    """Every leaf key of a config tree, dotted (`rollout.max_turns`)."""
    out = set()
    for k, v in tree.items():
        out |= _dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def _sft(args) -> int:
    _setup_logging()
    from pyvision_rl.sft import run_sft

    cfg = _cfg(args)
    out = run_sft(cfg)
    print(f"SFT checkpoint: {out}")
    return 0


def _demo(args) -> int:
    _setup_logging()
    from pyvision_rl.demo import run_demo

    return run_demo(_cfg(args))


def register(sub: argparse._SubParsersAction) -> None:
    over = "config overrides as key.sub=value (e.g. trainer.total_steps=5 rollout.n=4)"
    p = sub.add_parser("train", help="RL training (oversample-filter-rank GRPO) on Ray")
    p.add_argument("config", help="YAML config, e.g. configs/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", help=over)
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="accuracy avg@k of a checkpoint on a dataset, per data source")
    p.add_argument("checkpoint", help="HF model directory (or a run checkpoint dir containing model/)")
    p.add_argument("data", help="tasks: PyVision JSON rows, JSONL or Parquet")
    p.add_argument(
        "--config",
        default=None,
        help="config for sampling/sandbox settings (default: built-in; a run checkpoint's prompt, pixels "
        "and turn budget are used unless set here)",
    )
    p.add_argument("--out", default=None, help="where to write eval.json and trajectories.jsonl")
    p.add_argument("overrides", nargs="*", help=over)
    p.set_defaults(func=_eval)

    p = sub.add_parser("sft", help="multi-turn SFT cold start (loss on model tokens only)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help=over)
    p.set_defaults(func=_sft)

    p = sub.add_parser(
        "demo", help="the embedded demo: tiny model, SFT cold start, RL, before/after table, plots"
    )
    p.add_argument("config", nargs="?", default="configs/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", help=over)
    p.set_defaults(func=_demo)
