"""HFEngine on the tiny Qwen2.5-VL: batching with images, stop strings, logprobs vs a teacher-forced forward,
suppression of special tokens, per-request seeds, the request-level batcher, and in-place weight updates."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from helpers import png

from pyvision_rl.agent.protocol import ChatTokens, build_image_prompt
from pyvision_rl.engines.base import GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from pyvision_rl.engines.hf import HFEngine

    return HFEngine(str(tiny_model_dir))


def gen(engine, requests, sampling):
    """Submit every request concurrently (one coroutine each, as the agent loop does)."""
    samplings = sampling if isinstance(sampling, list) else [sampling] * len(requests)

    async def main():
        return await asyncio.gather(
            *(engine.generate(r, s) for r, s in zip(requests, samplings, strict=True))
        )

    return list(asyncio.run(main()))


@pytest.fixture(scope="module")
def requests_(engine):
    from pyvision_rl.models.processing import encode_images, image_token_count

    ct = ChatTokens(engine.tokenizer)
    reqs = []
    for i, (w, h, c) in enumerate([(112, 112, (255, 0, 0)), (56, 84, (0, 0, 255))]):
        img = png(w, h, c)
        _, grids = encode_images(engine.processor, [img])
        text = build_image_prompt(f"How many squares {i}?", w, h, "tiny_tool")
        reqs.append(GenerationRequest(ct.prompt_ids(text, [image_token_count(grids[0], 2)]), [img], f"r{i}"))
    reqs.append(GenerationRequest(ct.prompt_ids("Just text, no image.", []), [], "r2"))
    return reqs


def _teacher_forced(engine, req, out, temperature=1.0):
    from pyvision_rl.models.processing import build_forward_inputs, token_logprobs

    inputs = build_forward_inputs(
        engine.processor, [req.prompt_ids + out.token_ids], [req.images], pad_side="right"
    )
    with torch.no_grad():
        lp = token_logprobs(engine.model, inputs, engine.suppress_ids.tolist(), temperature=temperature)
    n = len(req.prompt_ids)
    return lp[0, n - 1 : n - 1 + len(out.token_ids)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_batched_sampling_logprobs_match_teacher_forcing(engine, requests_, temperature):
    outs = gen(engine, requests_, SamplingParams(temperature=temperature, max_new_tokens=24, seed=1, stop=[]))
    assert len(outs) == 3
    for req, out in zip(requests_, outs, strict=True):
        assert len(out.token_ids) == len(out.logprobs) > 0
        ref = _teacher_forced(engine, req, out, temperature)
        assert torch.allclose(ref, torch.tensor(out.logprobs), atol=1e-4), (ref, out.logprobs)
        assert out.finish_reason in ("eos", "length")
        if out.finish_reason == "length":
            assert len(out.token_ids) == 24
        else:
            assert out.token_ids[-1] in engine.eos_ids


def test_greedy_batched_equals_single_and_seeds_repeat(engine, requests_):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16, stop=[])
    batched = gen(engine, requests_, greedy)
    for req, out in zip(requests_, batched, strict=True):
        (single,) = gen(engine, [req], greedy)
        assert single.token_ids == out.token_ids
    s = SamplingParams(max_new_tokens=16, seed=123, stop=[])
    a = [o.token_ids for o in gen(engine, requests_, s)]
    b = [o.token_ids for o in gen(engine, requests_, s)]
    assert a == b


def test_stop_string_is_kept_and_cuts_the_turn(engine, requests_):
    """The random tiny model never writes `</code>`, so the stop string is taken from its own greedy output:
    the same mechanism (decoded-tail match, stop string kept) that stops real models at `</code>`."""
    greedy = SamplingParams(temperature=0.0, max_new_tokens=24, stop=[])
    (full,) = gen(engine, [requests_[0]], greedy)
    ids, dec = full.token_ids, engine.tokenizer.decode
    # the first token (after 2) whose text did not occur earlier in the output: the turn must end right there
    k = next(
        (
            k
            for k in range(3, len(ids) + 1)
            if dec(ids[k - 1 : k]).strip() and dec(ids[k - 1 : k]) not in dec(ids[: k - 1])
        ),
        None,
    )
    assert k is not None, f"greedy output too repetitive for a stop probe: {full.text!r}"
    stop = dec(ids[k - 1 : k])
    (cut,) = gen(engine, [requests_[0]], SamplingParams(temperature=0.0, max_new_tokens=24, stop=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.token_ids == ids[:k] and cut.text.endswith(stop)
    # the other rows of the batch keep generating after one row stops
    outs = gen(engine, requests_, SamplingParams(temperature=0.0, max_new_tokens=24, stop=[stop]))
    assert outs[0].token_ids == cut.token_ids


def test_special_tokens_are_never_sampled(engine, requests_):
    suppressed = set(engine.suppress_ids.tolist())
    outs = gen(engine, requests_ * 2, SamplingParams(max_new_tokens=64, seed=5, stop=[]))
    sampled = {t for o in outs for t in o.token_ids}
    assert not sampled & suppressed
    vision = ChatTokens(engine.tokenizer).vision_ids
    assert vision <= suppressed


def test_per_request_token_cap(engine, requests_):
    reqs = [
        GenerationRequest(r.prompt_ids, r.images, r.request_id, max_new_tokens=cap)
        for r, cap in zip(requests_, [3, 0, 8], strict=True)
    ]
    outs = gen(engine, reqs, SamplingParams(max_new_tokens=20, seed=0, stop=[]))
    assert len(outs[0].token_ids) <= 3 and outs[1].token_ids == [] and outs[1].finish_reason == "length"
    assert len(outs[2].token_ids) <= 8


def test_update_weights_in_place(engine, requests_):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12, stop=[])
    before = [o.token_ids for o in gen(engine, requests_, greedy)]
    original = {k: v.clone() for k, v in engine.model.state_dict().items()}
    name = (
        "lm_head.weight"
        if "lm_head.weight" in original
        else next(k for k in original if k.endswith("lm_head.weight"))
    )
    ptr = engine.model.state_dict()[name].data_ptr()
    w = torch.randn(original[name].shape, generator=torch.Generator().manual_seed(0))
    engine.update_weights({name: w.numpy()}, version=3)  # numpy arrives from Ray's object store
    assert engine.version == 3
    assert engine.model.state_dict()[name].data_ptr() == ptr, "updated in place"
    assert torch.equal(engine.model.state_dict()[name], w)
    changed = [o.token_ids for o in gen(engine, requests_, greedy)]
    assert changed != before
    with pytest.raises(KeyError, match="not in the engine's model"):
        engine.update_weights({"no.such.param": w}, version=4)
    engine.update_weights(list(original.items()), version=5)
    assert [o.token_ids for o in gen(engine, requests_, greedy)] == before and engine.version == 5


def test_seeded_tokens_do_not_depend_on_the_batch(engine, requests_):
    """A seeded request samples the same tokens alone, in a batch, at another position, or next to other
    seeds (each row has its own generator): batch composition and timing cannot change a trajectory."""
    s = [SamplingParams(max_new_tokens=20, seed=k, stop=[]) for k in (7, 8, 9)]
    together = [o.token_ids for o in gen(engine, requests_, s)]
    alone = [gen(engine, [r], [sp])[0].token_ids for r, sp in zip(requests_, s, strict=True)]
    assert together == alone
    rev = [o.token_ids for o in gen(engine, requests_[::-1], s[::-1])]
    assert rev[::-1] == together
    other = SamplingParams(max_new_tokens=20, seed=99, stop=[])
    mixed = gen(engine, [requests_[0], requests_[0], requests_[1]], [other, s[0], other])
    assert mixed[1].token_ids == together[0]
    assert gen(engine, [requests_[0]], [other])[0].token_ids != together[0], "seeds matter"


def test_requests_arriving_during_a_batch_form_the_next_one(engine, requests_):
    """Concurrent requests share one batched forward; one arriving while a batch runs is admitted into the
    next batch as soon as that one ends; the event loop keeps running while the model computes."""
    sp = SamplingParams(max_new_tokens=24, seed=0, stop=[])

    async def main():
        b0 = engine.batches
        first = [asyncio.ensure_future(engine.generate(r, sp)) for r in requests_]
        ticks = 0
        while engine.batches == b0 and ticks < 10_000:
            await asyncio.sleep(0.001)
            ticks += 1
            if ticks == 1:
                late = asyncio.ensure_future(engine.generate(requests_[0], sp))
        outs = await asyncio.gather(*first, late)
        return engine.batches - b0, ticks, outs

    t0 = time.perf_counter()
    n_batches, ticks, outs = asyncio.run(main())
    assert n_batches == 2, "the three concurrent requests in one batch, the late one in the next"
    assert ticks > 3, "the event loop ran while the first batch was computing"
    assert outs[3].token_ids == outs[0].token_ids  # same request, same seed, other batch
    assert time.perf_counter() - t0 < 60


def test_top_k_and_top_p_truncate_per_request(engine, requests_):
    """top_k=1 and a tiny top_p leave only the argmax: sampled rows equal the greedy ones, in one batch
    with an untruncated row that does sample."""
    greedy = [
        o.token_ids
        for o in gen(engine, requests_, SamplingParams(temperature=0.0, max_new_tokens=12, stop=[]))
    ]
    s = [
        SamplingParams(temperature=1.0, top_k=1, max_new_tokens=12, seed=3, stop=[]),
        SamplingParams(temperature=0.7, top_p=1e-6, max_new_tokens=12, seed=4, stop=[]),
        SamplingParams(temperature=1.0, max_new_tokens=12, seed=5, stop=[]),
    ]
    outs = gen(engine, requests_, s)
    assert outs[0].token_ids == greedy[0] and outs[1].token_ids == greedy[1]
    assert outs[2].token_ids != greedy[2]
