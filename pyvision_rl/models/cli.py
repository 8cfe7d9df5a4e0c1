"""`pyvision-rl make-tiny-model`: build the offline tiny Qwen-VL checkpoint."""

from __future__ import annotations

import argparse


def _make_tiny_model(args: argparse.Namespace) -> int:
    from pyvision_rl.config import TinyModelConfig
    from pyvision_rl.models.tiny import make_tiny_model

    cfg = TinyModelConfig(
        family=args.family, **({"hidden_size": args.hidden_size} if args.hidden_size else {})
    )
    out = make_tiny_model(args.out, cfg, seed=args.seed)
    from pyvision_rl.models.loading import load_policy

    model, processor = load_policy(out)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {cfg.family} tiny model to {out}: {n_params:,} parameters, vocab {len(processor.tokenizer)}"
    )
    return 0


def register(subparsers) -> None:
    """Add `make-tiny-model` to the `pyvision-rl` command."""
    p = subparsers.add_parser(
        "make-tiny-model",
        help="build a tiny random Qwen-VL checkpoint (offline, deterministic from the seed)",
        description="Build a tiny random Qwen2.5-VL / Qwen3-VL with a byte-level BPE tokenizer and processor, "
        "saved as an ordinary HF checkpoint directory.",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--family", choices=["qwen2_5_vl", "qwen3_vl"], default="qwen2_5_vl", help="architecture")
    p.add_argument("--seed", type=int, default=0, help="weight-init seed (same seed -> identical files)")
    p.add_argument("--hidden-size", type=int, default=0, help="text hidden size (default: model.tiny's 128)")
    p.set_defaults(func=_make_tiny_model)
