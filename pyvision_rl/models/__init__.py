"""Models: the offline tiny Qwen-VL factory, checkpoint loading and the image/token processing helpers.

The names load lazily (PEP 562): importing `pyvision_rl.models.cli` for `pyvision-rl --help` must not
pull in transformers and torch.
"""

from importlib import import_module

_WHERE = {
    "ModelLoadError": "loading",
    "load_policy": "loading",
    "load_processor": "loading",
    "make_tiny_model": "tiny",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"pyvision_rl.models.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'pyvision_rl.models' has no attribute {name!r}")
