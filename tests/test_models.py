"""The tiny offline Qwen-VL: build, save, reload, generate with an image, batched == single, processing checks."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pyvision_rl.config import TinyModelConfig
from pyvision_rl.models import ModelLoadError, load_policy, load_processor, make_tiny_model
from pyvision_rl.models.processing import (
    build_forward_inputs,
    check_vision_tokens,
    encode_images,
    image_placeholder_ids,
    image_token_count,
    special_ids,
    suppressed_token_ids,
    token_logprobs,
    vision_groups,
)
from pyvision_rl.types import ImageRef


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _noise(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _sequence(tok, text: str, grids, merge: int = 2) -> list[int]:
    """user turn: images then text, then the assistant header; tokenized segment by segment."""
    ids = tok("<|im_start|>user\n", add_special_tokens=False).input_ids
    for g in grids:
        ids += image_placeholder_ids(tok, image_token_count(g, merge))
    ids += tok(text + "<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    return ids


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_policy(tiny_model_dir)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_build_save_reload_and_generate(tmp_path, family):
    cfg = TinyModelConfig(family=family)
    out = make_tiny_model(tmp_path / family, cfg, seed=3)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    model, processor = load_policy(out)
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    assert model.config.model_type == family
    assert type(processor).__name__.endswith("Processor") and processor.image_processor is not None
    n_params = sum(p.numel() for p in model.parameters())
    assert 2e5 < n_params < 2e6

    # reload gives the exact same weights
    model2, _ = load_policy(out)
    sd1, sd2 = model.state_dict(), model2.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)

    # generate with an image, sampling with every special token but the terminators suppressed
    tok = processor.tokenizer
    img = _noise(112, 112, 0)
    _, grids = encode_images(processor, [img])
    assert grids == [(1, 8, 8)]
    ids = _sequence(tok, "How many red squares are there?", grids)
    inputs = build_forward_inputs(processor, [ids], [[img]])
    sup = suppressed_token_ids(tok, model.config.get_text_config().vocab_size)
    torch.manual_seed(0)
    gen = model.generate(**inputs, max_new_tokens=12, do_sample=True, top_k=0, top_p=1.0, suppress_tokens=sup)
    new = gen[0, len(ids) :].tolist()
    assert 1 <= len(new) <= 12
    assert not set(new) & set(sup)
    assert gen[0, : len(ids)].tolist() == ids


def test_deterministic_from_seed(tmp_path, tiny_model_dir):
    a = make_tiny_model(tmp_path / "a", seed=0)
    assert (a / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    b = make_tiny_model(tmp_path / "b", seed=1)
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_tokenizer_specials_and_chat_template(policy):
    _, processor = policy
    tok = processor.tokenizer
    sp = special_ids(tok)
    assert len(set(sp.values())) == 7
    # special tokens are single ids and round-trip
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[0] == sp["im_start"] and sp["image_pad"] in ids
    assert tok.decode(ids) == text
    # protocol text round-trips byte for byte
    code = "<code>\n```python\nprint(int((a[7::14, 7::14] == (255, 0, 0)).all(-1).sum()))\n```\n</code>"
    assert tok.decode(tok(code, add_special_tokens=False).input_ids) == code
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    rendered = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    sup = suppressed_token_ids(tok)
    assert sp["im_end"] not in sup and sp["endoftext"] not in sup
    assert {sp["image_pad"], sp["vision_start"], sp["im_start"], sp["video_pad"]} <= set(sup)


def test_batched_equals_single(policy):
    model, processor = policy
    tok = processor.tokenizer
    imgs = [_noise(112, 112, 1), _noise(56, 84, 2)]
    _, grids = encode_images(processor, imgs)
    seqs = [
        (_sequence(tok, "How many red squares are there?", [grids[0]]), [imgs[0]]),
        (_sequence(tok, "two images", [grids[1], grids[0]]), [_png(imgs[1]), imgs[0]]),  # bytes work too
        (_sequence(tok, "no image here, a longer text only prompt", []), []),
    ]
    sup = suppressed_token_ids(tok)
    with torch.no_grad():
        singles = [token_logprobs(model, build_forward_inputs(processor, [s], [i]), sup)[0] for s, i in seqs]
        for side in ("left", "right"):
            batch = build_forward_inputs(processor, [s for s, _ in seqs], [i for _, i in seqs], pad_side=side)
            assert batch["mm_token_type_ids"].sum() == sum(image_token_count(g, 2) for g in grids) + 16
            lp = token_logprobs(model, batch, sup)
            width = batch["input_ids"].shape[1]
            for b, (s, _) in enumerate(seqs):
                got = lp[b, width - len(s) :] if side == "left" else lp[b, : len(s) - 1]
                finite = torch.isfinite(singles[b])  # targets that are suppressed specials are -inf in both
                assert torch.equal(finite, torch.isfinite(got))
                assert (got[finite] - singles[b][finite]).abs().max() < 1e-5
        # without mm_token_type_ids the positions fall back to 1-D: the trap this module exists to avoid
        batch = build_forward_inputs(processor, [seqs[0][0]], [seqs[0][1]])
        batch.pop("mm_token_type_ids")
        wrong = token_logprobs(model, batch, sup)[0]
        finite = torch.isfinite(singles[0])
        assert (wrong[finite] - singles[0][finite]).abs().max() > 1e-4


def test_vision_token_checks(policy):
    _, processor = policy
    tok = processor.tokenizer
    img = _noise(112, 112, 3)
    _, grids = encode_images(processor, [img])
    ids = _sequence(tok, "q", grids)
    assert len(vision_groups(ids, tok)) == 1
    assert check_vision_tokens(ids, grids, 2, tok)
    assert not check_vision_tokens(ids, [], 2, tok)
    assert not check_vision_tokens(ids, [(1, 8, 10)], 2, tok)
    cut = ids[:10]  # a truncated image group
    assert not check_vision_tokens(cut, grids, 2, tok)
    with pytest.raises(ValueError, match="sequence 0"):
        build_forward_inputs(processor, [cut], [[img]])
    with pytest.raises(ValueError, match="sequence 1"):
        build_forward_inputs(processor, [ids, ids], [[img], []])
    # an ImageRef whose recorded grid differs from what the processor makes now is refused
    with pytest.raises(ValueError, match="recorded grid"):
        build_forward_inputs(processor, [ids], [[ImageRef(png=_png(img), grid_thw=(1, 4, 4))]])
    ok = build_forward_inputs(processor, [ids], [[ImageRef(png=_png(img), grid_thw=grids[0])]])
    assert ok["image_grid_thw"].tolist() == [list(grids[0])]


def test_load_errors_name_the_path(tmp_path, tiny_model_dir):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match=str(missing)):
        load_policy(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=f"{empty}.*config.json"):
        load_policy(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        (broken / f).write_bytes((tiny_model_dir / f).read_bytes())
    assert load_processor(broken).image_processor.patch_size == 14  # processor alone loads
    with pytest.raises(ModelLoadError, match=f"{broken}.*weights"):
        load_policy(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_policy(broken)


def test_cli_make_tiny_model(tmp_path, capsys):
    from pyvision_rl.cli import main

    rc = main(["make-tiny-model", "--out", str(tmp_path / "m"), "--seed", "2", "--hidden-size", "64"])
    assert rc == 0
    assert "parameters" in capsys.readouterr().out
    model, _ = load_policy(tmp_path / "m")
    assert model.config.get_text_config().hidden_size == 64


def test_load_real_checkpoint_layout(tmp_path, tiny_model_dir):
    """A dir laid out like the released Qwen2.5-VL checkpoints (flat preprocessor_config.json with
    min/max_pixels, chat_template.json, no processor_config.json) loads with its pixel bounds applied."""
    real = tmp_path / "real"
    real.mkdir()
    for f in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        (real / f).write_bytes((tiny_model_dir / f).read_bytes())
    (real / "chat_template.json").write_text(
        json.dumps({"chat_template": (tiny_model_dir / "chat_template.jinja").read_text()})
    )
    (real / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor",
                "min_pixels": 28 * 28,
                "max_pixels": 56 * 56,
                "patch_size": 14,
                "merge_size": 2,
                "temporal_patch_size": 2,
            }
        )
    )
    model, processor = load_policy(real)
    _, grids = encode_images(processor, [_noise(112, 112, 5)])
    assert grids == [(1, 4, 4)]  # 112x112 was scaled down to the 56x56 pixel cap
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    assert "<|image_pad|>" in processor.apply_chat_template(msgs, tokenize=False)
    # an explicit override wins over the file
    _, grids = encode_images(load_processor(real, max_pixels=112 * 112), [_noise(112, 112, 5)])
    assert grids == [(1, 8, 8)]


def test_each_distinct_image_is_encoded_once_per_process(policy):
    """The engine re-sends a trajectory's images every turn and the learner every epoch: the pixel cache
    returns exactly what a fresh batch encoding gives, and encodes a repeated image only once."""
    from pyvision_rl.models.processing import PIXEL_CACHE, _PixelCache, encode_images, to_pil

    _, processor = policy
    ims = [_png(_noise(56, 84, 11)), _png(_noise(112, 56, 12)), _png(_noise(56, 84, 11))]
    ref = processor.image_processor(images=[to_pil(i) for i in ims], return_tensors="pt")
    hits, misses = PIXEL_CACHE.hits, PIXEL_CACHE.misses
    px, grids = encode_images(processor, ims)
    assert torch.equal(px, ref["pixel_values"])
    assert grids == [tuple(g) for g in ref["image_grid_thw"].tolist()]
    px2, grids2 = encode_images(processor, ims[::-1])  # every one cached now, in another order
    assert PIXEL_CACHE.hits - hits == 3 and PIXEL_CACHE.misses - misses == 3
    parts = torch.split(px, [t * h * w for t, h, w in grids])
    assert grids2 == grids[::-1] and torch.equal(px2, torch.cat(parts[::-1]))
    small = _PixelCache(max_bytes=1)  # too small to keep anything: encodes every time, still right
    assert torch.equal(torch.cat([p for p, _ in small.encode(processor, ims)]), ref["pixel_values"])
    assert small.bytes == 0 and small.misses == 3
