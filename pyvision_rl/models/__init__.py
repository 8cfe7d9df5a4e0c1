"""Models: the offline tiny Qwen-VL factory, checkpoint loading and the image/token processing helpers."""

from pyvision_rl.models.loading import ModelLoadError, load_policy, load_processor
from pyvision_rl.models.tiny import make_tiny_model

__all__ = ["ModelLoadError", "load_policy", "load_processor", "make_tiny_model"]
