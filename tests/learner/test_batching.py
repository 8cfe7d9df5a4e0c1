"""Trajectories -> micro-batches: the one-position shift, padding rows, rank shards."""

import torch
from helpers import make_trajs

from pyvision_rl.learner.batching import build_micro_batch, chunk, make_micro_batches, shard_for_rank
from pyvision_rl.models.loading import load_processor


def test_mask_and_logprobs_are_shifted_onto_the_response(tiny_model_dir):
    proc = load_processor(tiny_model_dir)
    trajs = make_trajs(proc, n_groups=1, n=3)
    mb = build_micro_batch(proc, trajs, [1.0, -1.0, 0.5])
    ids = mb.inputs["input_ids"]
    assert mb.mask.shape == (3, ids.shape[1] - 1)
    for b, t in enumerate(trajs):
        pos = (mb.mask[b] > 0).nonzero().flatten()
        # position i scores token i+1: those must be exactly the model tokens of the response, in order
        model_tokens = [tok for tok, m in zip(t.response_ids, t.loss_mask, strict=True) if m]
        assert ids[b, pos + 1].tolist() == model_tokens
        assert (
            torch.all(mb.rollout_logp[b, pos] == -1.0)
            and mb.rollout_logp[b][mb.mask[b] == 0].abs().sum() == 0
        )
    assert mb.n_tokens == sum(sum(t.loss_mask) for t in trajs)
    assert mb.inputs["pixel_values"] is not None and mb.inputs["image_grid_thw"].shape[0] == 6
    assert int(mb.inputs["mm_token_type_ids"].sum()) > 0


def test_padding_batches_and_dummy_image(tiny_model_dir):
    proc = load_processor(tiny_model_dir)
    trajs = make_trajs(proc, n_groups=1, n=3, tool_image=False)
    for t in trajs:
        t.images = []
        t.prompt_ids = [
            i
            for i in t.prompt_ids
            if i
            not in set(
                proc.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"])
            )
        ]
    mbs = make_micro_batches(proc, trajs, [0.0] * 3, micro_batch_size=2, n_micro=4, add_dummy_image=True)
    assert len(mbs) == 4 and [m.n_seqs for m in mbs] == [2, 1, 0, 0]
    assert all("pixel_values" in m.inputs for m in mbs)  # every forward sees an image (ZeRO-3 gathers)
    assert all(m.mask[-1].sum() == 0 for m in mbs)  # the dummy row trains nothing
    assert mbs[2].n_tokens == 0 and mbs[0].n_tokens > 0


def test_chunk_and_shards():
    assert chunk(list(range(5)), 2) == [[0, 1, 2], [3, 4]]
    assert chunk([1], 3) == [[1], [], []]
    assert shard_for_rank(list("abcde"), 1, 2) == ["b", "d"]
