"""Load a Qwen-VL checkpoint directory (the tiny one or a real Qwen2.5-VL / Qwen3-VL) with a working processor.

Without torchvision, `AutoProcessor.from_pretrained(dir)` silently returns only the tokenizer, and the stock
processors cannot be built (they want a video processor). So the processor is rebuilt explicitly here: the
checkpoint's tokenizer + a `Qwen2VLImageProcessorPil` with the checkpoint's image settings + a processor
subclass that takes `video_processor=None`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor


class ModelLoadError(RuntimeError):
    """A checkpoint directory that cannot be loaded; the message names the path and what is wrong."""


class TinyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for images only (no video processor, hence no torchvision)."""

    # No `video_processor` in the signature: ProcessorMixin derives its sub-processors from it.
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
        self.video_processor = None


class TinyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3-VL processor for images only (no video processor, hence no torchvision)."""

    # No `video_processor` in the signature: ProcessorMixin derives its sub-processors from it.
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
        self.video_processor = None


_FAMILIES = {"qwen2_5_vl": TinyQwen2_5_VLProcessor, "qwen3_vl": TinyQwen3VLProcessor}
# Default image settings per family when a checkpoint does not say (Qwen2.5-VL: 14 px patches;
# Qwen3-VL: 16 px patches, mean/std 0.5).
_DEFAULT_IMAGE = {
    "qwen2_5_vl": {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2},
    "qwen3_vl": {
        "patch_size": 16,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    },
}
_IMAGE_KEYS = (
    "patch_size",
    "merge_size",
    "temporal_patch_size",
    "image_mean",
    "image_std",
    "min_pixels",
    "max_pixels",
    "size",
    "do_resize",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "do_convert_rgb",
)


def family_of(model_type: str) -> str:
    """'qwen2_5_vl' or 'qwen3_vl' for a config's model_type (Qwen2-VL is served like Qwen2.5-VL)."""
    if model_type in ("qwen2_5_vl", "qwen2_vl"):
        return "qwen2_5_vl"
    if model_type in ("qwen3_vl", "qwen3_vl_moe"):
        return "qwen3_vl"
    raise ValueError(
        f"unsupported model_type {model_type!r} (expected qwen2_5_vl, qwen2_vl, qwen3_vl, qwen3_vl_moe)"
    )


def build_processor(
    tokenizer,
    family: str,
    chat_template: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    **image_kwargs: Any,
):
    """An image-only Qwen-VL processor around `tokenizer` with a PIL image processor (no torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    settings = dict(_DEFAULT_IMAGE[family])
    settings.update({k: v for k, v in image_kwargs.items() if v is not None})
    if min_pixels is not None:
        settings["min_pixels"] = min_pixels
    if max_pixels is not None:
        settings["max_pixels"] = max_pixels
    image_processor = Qwen2VLImageProcessorPil(**settings)
    template = chat_template or getattr(tokenizer, "chat_template", None)
    return _FAMILIES[family](image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON ({e}); re-download or rebuild the checkpoint") from e


def _image_settings(path: Path) -> dict:
    """Image-processor settings from preprocessor_config.json or processor_config.json (HF writes either)."""
    found: dict = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = path / name
        if not f.is_file():
            continue
        data = _read_json(f)
        data = data.get("image_processor", data) if isinstance(data.get("image_processor"), dict) else data
        for k in _IMAGE_KEYS:
            if k in data and k not in found:
                found[k] = data[k]
    size = found.get("size")
    if isinstance(size, dict):  # HF stores min/max pixels as size.shortest_edge / size.longest_edge
        found.setdefault("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        found.setdefault("max_pixels", size.get("longest_edge", size.get("max_pixels")))
    found.pop("size", None)
    return found


def _check_dir(path: Path) -> dict:
    if not path.is_dir():
        raise ModelLoadError(
            f"{path}: not a directory; pass a HF checkpoint dir (make one: pyvision-rl make-tiny-model --out DIR)"
        )
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path}: no config.json; this is not a HF checkpoint directory")
    return _read_json(cfg_file)


def load_processor(path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None):
    """The processor of a Qwen-VL checkpoint dir, rebuilt explicitly (tokenizer + PIL image processor).

    `min_pixels` / `max_pixels` override the checkpoint's per-image pixel bounds.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    config = _check_dir(path)
    try:
        family = family_of(config.get("model_type", ""))
    except ValueError as e:
        raise ModelLoadError(f"{path}/config.json: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise ModelLoadError(
            f"{path}: cannot load the tokenizer ({type(e).__name__}: {e}); "
            "the dir needs tokenizer.json/tokenizer_config.json"
        ) from e
    if tokenizer.convert_tokens_to_ids("<|image_pad|>") in (None, tokenizer.unk_token_id):
        raise ModelLoadError(f"{path}: the tokenizer has no <|image_pad|> token; not a Qwen-VL tokenizer")
    chat_template = getattr(tokenizer, "chat_template", None)
    for name in ("chat_template.jinja", "chat_template.json"):
        f = path / name
        if not chat_template and f.is_file():
            chat_template = f.read_text() if name.endswith(".jinja") else _read_json(f).get("chat_template")
    settings = _image_settings(path)
    if min_pixels is not None:
        settings["min_pixels"] = min_pixels
    if max_pixels is not None:
        settings["max_pixels"] = max_pixels
    try:
        return build_processor(tokenizer, family, chat_template=chat_template, **settings)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot build the processor ({type(e).__name__}: {e})") from e


def load_policy(
    path: str | Path,
    dtype=None,
    device: str = "cpu",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
):
    """Load a Qwen-VL checkpoint dir as (model, processor). `dtype` None or "auto": bf16 on CUDA, fp32 on CPU.

    Raises ModelLoadError naming the path and the problem.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    path = Path(path)
    processor = load_processor(path, min_pixels=min_pixels, max_pixels=max_pixels)
    if dtype in (None, "auto"):
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelLoadError(f"{path}: no weights (*.safetensors or *.bin) in the checkpoint dir")
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot load the model weights ({type(e).__name__}: {e})") from e
    model.to(device)
    model.eval()
    return model, processor
