"""The `pyvision-rl` command. Each part of the package registers its own subcommands here.

A registrar is `register(subparsers) -> None`; it adds a subparser whose `func(args) -> int` runs it.
Heavy imports happen inside `func`, so `pyvision-rl --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules exposing `register(subparsers)`. Only subcommands that work are listed.
_REGISTRARS = [
    "pyvision_rl.models.cli",
    "pyvision_rl.data.cli",
    "pyvision_rl.sandbox.cli",
    "pyvision_rl.train_cli",
    "pyvision_rl.viewer",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyvision-rl",
        description="Agentic multimodal RL (PyVision-RL) on Ray: train VLMs to solve image/video questions with Python.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _REGISTRARS:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # that part is not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pyvision_rl import QUIET_ENV

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    parser = build_parser()
    # Overrides may follow options (`eval CKPT DATA --out DIR key=value`): argparse leaves them unparsed.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from pyvision_rl.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # DataError and friends carry a user-facing message
        if type(e).__name__ in {"DataError", "SandboxError", "ModelLoadError"}:
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
