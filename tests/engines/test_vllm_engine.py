"""VLLMEngine against real vLLM (`make test-vllm`: the vllm-cpu build in .venv-vllm on CPU, vLLM on GPU).

The module-level tests run everywhere; the `vllm` ones need an importable vllm and share one engine
(an AsyncLLM start costs ~20 s on 2 cores). PYVISION_VLLM_MODEL_DIR points at the tiny checkpoint built by
.venv (the CPU vLLM venv pins a transformers that cannot build it); elsewhere the fixture builds it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path

import pytest
from helpers import png

from pyvision_rl.engines.base import GenerationRequest, SamplingParams
from pyvision_rl.engines.vllm import VLLMEngine, collapse_image_pads

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_module_imports_without_vllm_and_collapses_image_runs():
    assert VLLMEngine.__name__ == "VLLMEngine"
    assert collapse_image_pads([1, 9, 9, 9, 2, 9, 3, 9, 9], 9) == [1, 9, 2, 9, 3, 9]
    assert collapse_image_pads([], 9) == []


def test_cpu_shim_does_nothing_where_torchvision_exists(monkeypatch):
    from pyvision_rl.engines import vllm_cpu_shim

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "torchvision" else real(n, *a)
    )
    monkeypatch.delattr(vllm_cpu_shim.register, "done", raising=False)
    name = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
    before = sys.modules.get(name)
    vllm_cpu_shim.register()
    assert sys.modules.get(name) is before and not getattr(vllm_cpu_shim.register, "done", False)


@pytest.fixture(scope="module")
def model_dir(request) -> Path:
    env = os.environ.get("PYVISION_VLLM_MODEL_DIR")
    return Path(env) if env else request.getfixturevalue("tiny_model_dir")


@pytest.fixture(scope="module")
def engine(model_dir):
    if not HAS_VLLM:
        pytest.skip("vllm is not importable here: run `make test-vllm`")
    eng = VLLMEngine(str(model_dir), max_model_len=4096, max_images=4, seeded_requests=True)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf(model_dir):
    from pyvision_rl.models import load_policy

    return load_policy(model_dir)


def _run(eng: VLLMEngine, reqs: list[GenerationRequest], sampling: SamplingParams):
    async def go():
        return await asyncio.gather(*[eng.generate(r, sampling) for r in reqs])

    return asyncio.run(go())


def _prompt(eng: VLLMEngine, image: bytes) -> list[int]:
    from pyvision_rl.agent.protocol import ChatTokens, build_image_prompt
    from pyvision_rl.models.processing import encode_images, image_token_count, merge_size_of

    _, grids = encode_images(eng.processor, [image])
    n = image_token_count(grids[0], merge_size_of(eng.processor))
    return ChatTokens(eng.tokenizer).prompt_ids(build_image_prompt("How many squares?", 112, 112), [n])


def _hf_logprobs(hf, ids: list[int], images: list[bytes], temperature: float):
    import torch

    from pyvision_rl.models.processing import build_forward_inputs, suppressed_token_ids, token_logprobs

    model, proc = hf
    inp = build_forward_inputs(proc, [ids], [images], pad_side="right")  # with mm_token_type_ids
    vocab = model.get_output_embeddings().weight.shape[0]
    with torch.no_grad():
        return token_logprobs(model, inp, suppressed_token_ids(proc.tokenizer, vocab), temperature)[0]


def _scripted_weights(hf, last_prompt_id: int, script: list[int], forbidden: int) -> dict:
    """Weights under which the model greedily writes `script` after `last_prompt_id` whatever the
    context: attention and MLP outputs zeroed (the residual stream is the current token's embedding), and
    lm_head maps each script token's normalised embedding to the next one. `forbidden` (a special token)
    gets the highest logit of all at the first step: the engine's mask must still never sample it."""
    import torch

    model, _ = hf
    sd = model.state_dict()
    emb = sd[next(n for n in sd if n.endswith("embed_tokens.weight"))].float()
    out = {n: torch.zeros_like(t) for n, t in sd.items() if n.endswith(("o_proj.weight", "down_proj.weight"))}
    head = torch.zeros_like(sd["lm_head.weight"])
    chain = [last_prompt_id, *script]
    for a, b in zip(chain, chain[1:], strict=False):
        head[b] += 60.0 * emb[a] / emb[a].norm()
    head[forbidden] += 120.0 * emb[last_prompt_id] / emb[last_prompt_id].norm()
    out["lm_head.weight"] = head
    return out


@pytest.mark.vllm
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_multi_turn_images_logprobs_match_hf(engine, hf, temperature):
    """Two turns, the second after an observation carrying a second image: vLLM's processed log-probs of
    the tokens it sampled equal the learner's teacher-forced HF log-probs (same fp32 weights, same mask,
    same temperature) within 1e-5. Only summation order differs (oneDNN GEMMs and vLLM's paged attention
    vs torch): measured 4.8e-7 (T=1) and 9.5e-7 (T=0.7) over 48 tokens. An HF side without
    mm_token_type_ids (1-D positions) is 4e-4 to 6e-4 off, so the tolerance catches that mismatch."""
    import torch

    from pyvision_rl.agent.protocol import ChatTokens
    from pyvision_rl.models.processing import encode_images, image_token_count, merge_size_of

    eng = engine
    img0, img1 = png(112, 112, (255, 0, 0)), png(84, 84, (0, 0, 255))
    ids = _prompt(eng, img0)
    sampling = SamplingParams(temperature=temperature, max_new_tokens=24, stop=[], seed=3)
    first = _run(eng, [GenerationRequest(ids, [img0], "mt")], sampling)[0]
    assert first.token_ids and len(first.logprobs) == len(first.token_ids)
    _, grids = encode_images(eng.processor, [img1])
    obs = ChatTokens(eng.tokenizer).observation_ids(
        "3", [image_token_count(grids[0], merge_size_of(eng.processor))], first_index=1
    )
    ctx = ids + first.token_ids + obs
    second = _run(eng, [GenerationRequest(ctx, [img0, img1], "mt")], sampling)[0]
    assert second.token_ids
    full = ctx + second.token_ids
    ref = _hf_logprobs(hf, full, [img0, img1], temperature)
    n1, n2 = len(first.token_ids), len(second.token_ids)
    got = torch.tensor(first.logprobs + second.logprobs)
    want = torch.cat([ref[len(ids) - 1 : len(ids) - 1 + n1], ref[len(ctx) - 1 : len(ctx) - 1 + n2]])
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.vllm
def test_stop_kept_mask_weight_update_and_restore(engine, hf):
    """In-place update to scripted weights: the model writes a code turn ending in `</code>` (kept, finish
    reason "stop") and never the special token it prefers; restoring the weights restores the original
    outputs and log-probs exactly."""
    from pyvision_rl.models.processing import special_ids

    eng = engine
    image = png(112, 112, (0, 255, 0))
    ids = _prompt(eng, image)
    req = [GenerationRequest(ids, [image], "w")]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12, stop=["</code>"])
    before = _run(eng, req, greedy)[0]
    script = eng.tokenizer("<code>\n```python\nprint(1)\n```\n</code>", add_special_tokens=False)["input_ids"]
    pad = special_ids(eng.tokenizer)["image_pad"]
    new = _scripted_weights(hf, ids[-1], script, forbidden=pad)
    old = {n: hf[0].state_dict()[n].clone() for n in new}
    eng.update_weights(new, version=5)
    try:
        assert eng.version == 5
        for temp in (0.0, 1.0):  # the mask holds under sampling too
            out = _run(eng, req, SamplingParams(temperature=temp, max_new_tokens=32, stop=["</code>"]))[0]
            assert out.token_ids == script and pad not in out.token_ids
            assert out.finish_reason == "stop" and out.text.endswith("</code>")
    finally:
        eng.update_weights(old, version=6)
    after = _run(eng, req, greedy)[0]
    assert after.token_ids == before.token_ids and after.logprobs == before.logprobs


@pytest.mark.vllm
def test_concurrent_requests_caps_seeds_and_image_cache(engine):
    """Many concurrent image requests through the async engine, each within its own token cap; a seed
    makes sampling repeatable and is set on a request only when asked; an image is decoded once."""
    from pyvision_rl.models.processing import suppressed_token_ids

    eng = engine
    pngs = [png(112, 112, (40 * i % 256, 80, 200 - 10 * i)) for i in range(8)]
    reqs = [
        GenerationRequest(_prompt(eng, pngs[i % 8]), [pngs[i % 8]], f"c{i}", max_new_tokens=4 + i % 5)
        for i in range(32)
    ]
    sampling = SamplingParams(max_new_tokens=16, stop=[], seed=11)
    outs = _run(eng, reqs, sampling)
    assert len(outs) == 32
    banned = set(suppressed_token_ids(eng.tokenizer, 100_000))
    for r, o in zip(reqs, outs, strict=True):
        assert 0 < len(o.token_ids) <= r.max_new_tokens and len(o.logprobs) == len(o.token_ids)
        assert o.finish_reason in ("length", "eos") and not banned & set(o.token_ids)
    again = _run(eng, reqs[:4], sampling)
    assert [o.token_ids for o in again] == [o.token_ids for o in outs[:4]]
    assert eng._params(SamplingParams(seed=None), 8).seed is None
    assert eng._params(sampling, 8).seed is not None
    eng.seeded_requests = False  # the default outside run.deterministic: seeds dropped (slow in vLLM)
    assert eng._params(sampling, 8).seed is None
    eng.seeded_requests = True
    pil_a, uuid_a = eng._multi_modal([pngs[0]])
    pil_b, uuid_b = eng._multi_modal([pngs[0]])
    assert pil_a[0] is pil_b[0] and uuid_a == uuid_b and uuid_a[0] is not None


@pytest.mark.gpu
@pytest.mark.vllm
@pytest.mark.skipif(
    not HAS_VLLM or not __import__("torch").cuda.is_available(),
    reason="vLLM's sleep mode needs CUDA (its cumem allocator offloads GPU memory; the CPU backend has none) "
    "and the IPC weight transfer CUDA IPC",
)
def test_gpu_sleep_wake_and_ipc_weight_update(model_dir, hf):
    """Sleep mode keeps the outputs; CUDA weights go through vLLM's IPC weight-transfer backend, change the
    outputs, and restoring them restores the outputs exactly."""
    eng = VLLMEngine(str(model_dir), max_model_len=2048, enable_sleep_mode=True, gpu_memory_utilization=0.3)
    try:
        assert eng._ipc
        image = png(112, 112, (9, 9, 9))
        ids = _prompt(eng, image)
        req = [GenerationRequest(ids, [image], "s")]
        greedy = SamplingParams(temperature=0.0, max_new_tokens=8, stop=[])
        before = _run(eng, req, greedy)[0]
        eng.sleep()
        assert _run(eng, req, greedy)[0].token_ids == before.token_ids  # generate wakes it
        script = eng.tokenizer("<answer>\n\\boxed{3}\n</answer>", add_special_tokens=False)["input_ids"]
        new = _scripted_weights(hf, ids[-1], script, forbidden=eng.image_pad_id)
        old = {n: hf[0].state_dict()[n] for n in new}
        eng.update_weights({n: t.cuda() for n, t in new.items()}, version=1)
        assert _run(eng, req, greedy)[0].token_ids[: len(script)] == script
        eng.update_weights({n: t.cuda() for n, t in old.items()}, version=2)
        assert _run(eng, req, greedy)[0].token_ids == before.token_ids
    finally:
        eng.close()
