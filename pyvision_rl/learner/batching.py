"""Trajectories -> model-ready micro-batches with token-aligned advantages, old log-probs and loss mask.

A sequence is `prompt_ids + response_ids` (never re-tokenized). `token_logprobs` gives, at position i, the
log-prob of token i+1, so response token j (sequence position P + j, P = len(prompt_ids)) is scored at
position P + j - 1: every per-token tensor here is already shifted by one and has length L - 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from PIL import Image

from pyvision_rl.models.processing import (
    build_forward_inputs,
    encode_images,
    image_placeholder_ids,
    special_ids,
)
from pyvision_rl.types import Trajectory


@dataclass
class MicroBatch:
    """One forward/backward: model inputs plus per-position training tensors of shape (B, L-1)."""

    inputs: dict[str, torch.Tensor]
    mask: torch.Tensor  # 1.0 where the next token was sampled by the model
    rollout_logp: torch.Tensor  # the sampler's log-probs at those positions, 0 elsewhere
    advantages: torch.Tensor  # (B,) one advantage per sequence
    n_tokens: int  # mask.sum(): model tokens trained on
    n_seqs: int  # real trajectories (a padding row or batch counts 0)
    old_logp: torch.Tensor | None = None  # filled by the learner (recomputed) or = rollout_logp

    def to(self, device: torch.device | str) -> MicroBatch:
        def mv(x):
            return x.to(device) if isinstance(x, torch.Tensor) else x

        rest = (mv(getattr(self, f.name)) for f in fields(self)[1:])
        return MicroBatch({k: mv(v) for k, v in self.inputs.items()}, *rest)


def _dummy_row(processor) -> tuple[list[int], list[Any]]:
    """A sequence with one tiny image and nothing to learn: keeps a vision forward on every rank (ZeRO-3)."""
    img = Image.new("RGB", (28, 28))
    _, grids = encode_images(processor, [img])
    merge = int(getattr(processor.image_processor, "merge_size", 2))
    t, h, w = grids[0]
    ids = image_placeholder_ids(processor, t * h * w // (merge * merge)) + [
        special_ids(processor)["endoftext"]
    ]
    return ids, [img]


def build_micro_batch(
    processor,
    trajs: Sequence[Trajectory],
    advantages: Sequence[float] | torch.Tensor,
    add_dummy_image: bool = False,
) -> MicroBatch:
    """Pack `trajs` (right padded) into one MicroBatch. `add_dummy_image` appends a zero-weight row with an
    image when none of `trajs` has one (or when `trajs` is empty): under ZeRO-3 with several ranks every
    rank must run the vision tower in every forward, or the parameter gathers deadlock."""
    seqs: list[list[int]] = []
    images: list[list[Any]] = []
    for t in trajs:
        if len(t.loss_mask) != len(t.response_ids) or len(t.rollout_logprobs) not in (0, len(t.response_ids)):
            raise ValueError(
                f"trajectory {t.task_id} (group {t.group_id}): response_ids ({len(t.response_ids)}), loss_mask "
                f"({len(t.loss_mask)}) and rollout_logprobs ({len(t.rollout_logprobs)}) must have equal lengths"
            )
        seqs.append(list(t.prompt_ids) + list(t.response_ids))
        images.append(list(t.images))
    adv = [float(a) for a in advantages]
    if add_dummy_image and not any(images):
        ids, ims = _dummy_row(processor)
        seqs.append(ids)
        images.append(ims)
        adv.append(0.0)
    inputs = build_forward_inputs(processor, seqs, images, pad_side="right")
    b, L = inputs["input_ids"].shape
    mask = torch.zeros(b, max(L - 1, 0))
    rollout = torch.zeros(b, max(L - 1, 0))
    for i, t in enumerate(trajs):
        p, r = len(t.prompt_ids), len(t.response_ids)
        if r == 0:
            continue
        if p == 0:
            raise ValueError(
                f"trajectory {t.task_id}: empty prompt_ids; the first response token has no context"
            )
        mask[i, p - 1 : p - 1 + r] = torch.as_tensor(t.loss_mask, dtype=torch.float32)
        if t.rollout_logprobs:
            rollout[i, p - 1 : p - 1 + r] = torch.as_tensor(t.rollout_logprobs, dtype=torch.float32)
    rollout = rollout * mask
    return MicroBatch(
        inputs, mask, rollout, torch.tensor(adv, dtype=torch.float32), int(mask.sum()), len(trajs)
    )


def chunk(items: Sequence[Any], n_chunks: int) -> list[list[Any]]:
    """Split into `n_chunks` contiguous nearly equal parts (some may be empty when items are few)."""
    q, r = divmod(len(items), n_chunks)
    start = [k * q + min(k, r) for k in range(n_chunks + 1)]
    return [list(items[start[k] : start[k + 1]]) for k in range(n_chunks)]


def make_micro_batches(
    processor,
    trajs: Sequence[Trajectory],
    advantages: Sequence[float] | torch.Tensor,
    micro_batch_size: int,
    n_micro: int | None = None,
    add_dummy_image: bool = False,
) -> list[MicroBatch]:
    """Micro-batches of at most `micro_batch_size` trajectories, sorted by length to cut padding.

    `n_micro` (>= the needed count) pads the list with zero-weight batches, so that every data-parallel
    rank runs the same number of forward/backward passes (ZeRO's collectives must line up).
    """
    order = sorted(range(len(trajs)), key=lambda i: trajs[i].length)
    mbs = max(1, micro_batch_size)
    groups = [order[i : i + mbs] for i in range(0, len(order), mbs)]
    out = [
        build_micro_batch(processor, [trajs[i] for i in g], [advantages[i] for i in g], add_dummy_image)
        for g in groups
    ]
    while n_micro is not None and len(out) < n_micro:
        out.append(build_micro_batch(processor, [], [], add_dummy_image=True))
    return out


def shard_for_rank(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """This rank's slice of a list (strided: ranks get nearly equal counts, group refs stay whole)."""
    return list(items[rank::world_size])
