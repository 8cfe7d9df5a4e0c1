"""Task data: loading (PyVision-RL rows, plain JSONL/JSON/Parquet), synthetic tasks, video files."""

from pyvision_rl.data.loading import DataError, load_tasks

__all__ = ["DataError", "load_tasks"]
