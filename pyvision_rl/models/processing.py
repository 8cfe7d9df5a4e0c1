"""The one place that knows how images become tokens and tensors (agent loop, engines and learner all call it).

A sequence is token ids that already contain, for each image, `<|vision_start|>` + n x `<|image_pad|>` +
`<|vision_end|>` with n = t*h*w / merge_size**2 of that image's grid (`image_placeholder_ids`). Images are
encoded here and only here (`encode_images`), and `build_forward_inputs` checks every sequence's vision
groups against its images' grids before anything reaches the model, so "Image features and image tokens
do not match" is caught with a message naming the sequence instead of deep inside a forward.

Every forward and `generate` must get `mm_token_type_ids` (1 on image tokens): without it Qwen-VL silently
falls back to 1-D positions and sampler and trainer log-probs disagree by up to ~10 nats.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from PIL import Image

from pyvision_rl.types import ImageRef

# Tokens that end a model turn; everything else that is special is never sampled (see suppressed_token_ids).
TURN_TERMINATORS = ("<|im_end|>", "<|endoftext|>")
_SPECIAL_NAMES = {
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "endoftext": "<|endoftext|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image_pad": "<|image_pad|>",
    "video_pad": "<|video_pad|>",
}

ImageLike = Image.Image | bytes | ImageRef


def _tokenizer(processor_or_tokenizer):
    return getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)


def to_pil(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a PIL image, PNG/JPEG bytes or an ImageRef."""
    if isinstance(image, ImageRef):
        image = image.png
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
        image.load()
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, image bytes or ImageRef, got {type(image).__name__}")
    return image.convert("RGB") if image.mode != "RGB" else image


def special_ids(tokenizer) -> dict[str, int]:
    """Ids of im_start, im_end, endoftext, vision_start, vision_end, image_pad, video_pad."""
    tok = _tokenizer(tokenizer)
    out = {}
    for key, text in _SPECIAL_NAMES.items():
        tid = tok.convert_tokens_to_ids(text)
        if tid is None or tid == tok.unk_token_id:
            raise ValueError(f"the tokenizer has no {text} token; is this a Qwen-VL tokenizer?")
        out[key] = int(tid)
    return out


def suppressed_token_ids(tokenizer, vocab_size: int | None = None) -> list[int]:
    """Ids a policy must never sample: every special/added token except the turn terminators
    (<|im_end|>, <|endoftext|>), plus the model's embedding rows past the tokenizer (`vocab_size`).

    A sampled `<|image_pad|>` would crash the next turn; sampling and training log-probs apply the same mask.
    """
    tok = _tokenizer(tokenizer)
    keep = {tok.convert_tokens_to_ids(t) for t in TURN_TERMINATORS}
    ids = set(getattr(tok, "added_tokens_decoder", {}).keys()) | set(tok.all_special_ids)
    n_tok = len(tok)
    if vocab_size is not None and vocab_size > n_tok:
        ids |= set(range(n_tok, vocab_size))
    return sorted(int(i) for i in ids if i not in keep)


def image_token_count(grid_thw: Sequence[int], merge_size: int) -> int:
    """Number of `<|image_pad|>` tokens for an image with this (t, h, w) patch grid."""
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // (merge_size * merge_size)


def image_placeholder_ids(tokenizer, n_tokens: int) -> list[int]:
    """`<|vision_start|>` + n x `<|image_pad|>` + `<|vision_end|>` as ids."""
    ids = special_ids(tokenizer)
    return [ids["vision_start"]] + [ids["image_pad"]] * n_tokens + [ids["vision_end"]]


def merge_size_of(processor) -> int:
    """The spatial merge size of the processor's image processor (2 for Qwen-VL)."""
    return int(getattr(processor.image_processor, "merge_size", 2))


class _PixelCache:
    """Encoded images by (image processor, PNG bytes), least recently used first out, bounded in bytes.

    A trajectory's images are re-sent with every turn (the engine sees the whole conversation each time)
    and again to the learner for every epoch: each distinct image is encoded once per process."""

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes, self.bytes = max_bytes, 0
        self._d: OrderedDict[tuple[int, bytes], tuple[torch.Tensor, tuple[int, int, int]]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def encode(
        self, processor, images: Sequence[ImageLike]
    ) -> list[tuple[torch.Tensor, tuple[int, int, int]]]:
        ip = processor.image_processor
        raw = [im.png if isinstance(im, ImageRef) else im if isinstance(im, bytes) else None for im in images]
        keys = [None if r is None else (id(ip), hashlib.blake2b(r, digest_size=16).digest()) for r in raw]
        out: list[Any] = [None] * len(images)
        with self._lock:
            for i, k in enumerate(keys):
                if k is not None and k in self._d:
                    self._d.move_to_end(k)
                    out[i] = self._d[k]
            todo = [i for i, o in enumerate(out) if o is None]
            self.hits += len(images) - len(todo)
            self.misses += len(todo)
        if todo:
            enc = ip(images=[to_pil(images[i]) for i in todo], return_tensors="pt")
            grids = [tuple(int(x) for x in g) for g in enc["image_grid_thw"].tolist()]
            sizes = [t * h * w for t, h, w in grids]
            for i, px, g in zip(todo, torch.split(enc["pixel_values"], sizes), grids, strict=True):
                out[i] = (px, g)
                if keys[i] is not None and px.nbytes <= self.max_bytes:
                    with self._lock:
                        if keys[i] not in self._d:
                            self._d[keys[i]] = (px, g)
                            self.bytes += px.nbytes
                        while self.bytes > self.max_bytes:
                            self.bytes -= self._d.popitem(last=False)[1][0].nbytes
        return out


PIXEL_CACHE = _PixelCache()


def encode_images(
    processor, images: Sequence[ImageLike]
) -> tuple[torch.Tensor | None, list[tuple[int, int, int]]]:
    """Pixel patches (all images concatenated) and the (t, h, w) grid of each image, in order (each distinct
    image encoded once per process: `PIXEL_CACHE`)."""
    if not images:
        return None, []
    enc = PIXEL_CACHE.encode(processor, images)
    return torch.cat([px for px, _ in enc]), [g for _, g in enc]


def vision_groups(ids: Sequence[int], tokenizer) -> list[int]:
    """Lengths of the `<|image_pad|>` runs in `ids`, in order. A run must sit between vision_start and
    vision_end; a run that does not is reported as a negative length (so it never matches a grid)."""
    sp = special_ids(tokenizer)
    pad, start, end = sp["image_pad"], sp["vision_start"], sp["vision_end"]
    ids = list(ids)
    groups, i = [], 0
    while i < len(ids):
        if ids[i] != pad:
            i += 1
            continue
        j = i
        while j < len(ids) and ids[j] == pad:
            j += 1
        wrapped = i > 0 and ids[i - 1] == start and j < len(ids) and ids[j] == end
        groups.append(j - i if wrapped else -(j - i))
        i = j
    return groups


def check_vision_tokens(
    ids: Sequence[int], grids: Sequence[Sequence[int]], merge_size: int, tokenizer
) -> bool:
    """True when the image-token groups in `ids` match `grids` one to one, in order, and no stray
    `<|video_pad|>` is present."""
    if special_ids(tokenizer)["video_pad"] in ids:
        return False
    return vision_groups(ids, tokenizer) == [image_token_count(g, merge_size) for g in grids]


def build_forward_inputs(
    processor,
    sequences: Sequence[Sequence[int]],
    images: Sequence[Sequence[ImageLike]] | None = None,
    pad_side: str = "left",
    pad_id: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Batch token sequences and their images into model inputs.

    Returns input_ids, attention_mask, mm_token_type_ids (1 on image tokens) and, when any image is
    present, pixel_values and image_grid_thw (images of all sequences concatenated in order). Pass the
    dict as-is to `model(**inputs)` or `model.generate(**inputs)`.
    `pad_side` "left" for generation, "right" for training. Raises ValueError naming the sequence whose
    image tokens do not match its images (or an ImageRef whose recorded grid differs from the encoding).
    """
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    tok = _tokenizer(processor)
    sp = special_ids(tok)
    if pad_id is None:
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else sp["endoftext"]
    images = images if images is not None else [[] for _ in sequences]
    if len(images) != len(sequences):
        raise ValueError(f"{len(sequences)} sequences but {len(images)} image lists")
    merge = merge_size_of(processor)

    flat = [im for per_seq in images for im in per_seq]
    pixel_values, grids = encode_images(processor, flat)
    k = 0
    for b, (seq, per_seq) in enumerate(zip(sequences, images, strict=True)):
        seq_grids = grids[k : k + len(per_seq)]
        for j, (im, g) in enumerate(zip(per_seq, seq_grids, strict=True)):
            if isinstance(im, ImageRef) and tuple(im.grid_thw) != g:
                raise ValueError(
                    f"sequence {b}, image {j}: recorded grid {tuple(im.grid_thw)} != processor grid {g}; "
                    "the processor's pixel bounds changed since the image was tokenized"
                )
        if not check_vision_tokens(seq, seq_grids, merge, tok):
            raise ValueError(
                f"sequence {b}: image-token groups {vision_groups(seq, tok)} do not match its "
                f"{len(per_seq)} image(s) needing {[image_token_count(g, merge) for g in seq_grids]} tokens"
            )
        k += len(per_seq)

    max_len = max((len(s) for s in sequences), default=0)
    input_ids = torch.full((len(sequences), max_len), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), max_len), dtype=torch.long)
    for b, seq in enumerate(sequences):
        n = len(seq)
        sl = slice(max_len - n, max_len) if pad_side == "left" else slice(0, n)
        input_ids[b, sl] = torch.as_tensor(list(seq), dtype=torch.long)
        attention[b, sl] = 1
    mm_types = torch.zeros_like(input_ids)
    mm_types[(input_ids == sp["image_pad"]) & (attention == 1)] = 1
    out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention, "mm_token_type_ids": mm_types}
    if pixel_values is not None:
        out["pixel_values"] = pixel_values
        out["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    if device is not None:
        out = {key: v.to(device) for key, v in out.items()}
    return out


# Logits per LM-head chunk (fp32): ~128 MB, so the head, log-softmax and entropy of one chunk stay small.
LOGIT_CHUNK_ELEMS = 2**25


def sampler_logprobs(
    logits, targets, suppress=None, temperature: float | torch.Tensor = 1.0, with_entropy=False
):
    """log p(target) under the sampler's distribution: `logits` / `temperature` (a float or one per row,
    (B, 1)) with the `suppress` ids masked. The one log-prob formula of the package (the HF engine's
    sampled-token log-probs and the learner's `token_logprobs`); `with_entropy` adds the entropy (nats)."""
    logits = logits.float()
    if not isinstance(temperature, float) or temperature != 1.0:
        logits = logits / temperature
    if suppress is not None:
        # A large finite negative, not -inf: the sampler's mask, and no 0 * inf = NaN in the entropy.
        logits = logits.index_fill(-1, suppress, -1e30)
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return logp
    return logp, lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def _head_logprobs(head, hidden, targets, suppress, temperature: float, with_entropy: bool):
    return sampler_logprobs(head(hidden), targets, suppress, temperature, with_entropy)


def token_logprobs(
    model,
    inputs: dict[str, torch.Tensor],
    suppress_ids: Sequence[int] | torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next token: out[b, i] = log p(input_ids[b, i+1] | input_ids[b, :i+1]), shape (B, L-1).

    The one log-prob computation of the package (learner, reference model, tests). Only positions where
    `mask` (B, L-1) is > 0 are computed (default: every position whose next token is real); the others are
    0. The backbone's last hidden states are gathered at those positions first, then the LM head and the
    log-softmax run in chunks of ~`LOGIT_CHUNK_ELEMS` logits, each recomputed in backward, so no (B, L, V)
    or (N, V) tensor is ever alive: memory is O(L * hidden + chunk * V). Logits are divided by
    `temperature` and `suppress_ids` masked first — the sampler's mask — so trainer and sampler log-probs
    agree. `entropy=True` returns (logp, entropy) with the per-position entropy (nats) of the same
    distribution.
    """
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state[:, :-1]
    ids = inputs["input_ids"]
    if mask is None:
        mask = inputs["attention_mask"][:, 1:] if "attention_mask" in inputs else torch.ones_like(ids[:, 1:])
    sel = mask.to(hidden.device) > 0
    h, tgt = hidden[sel], ids[:, 1:][sel]
    head = model.get_output_embeddings()
    sup = None
    if suppress_ids is not None and len(suppress_ids) > 0:
        sup = torch.as_tensor(suppress_ids, dtype=torch.long, device=h.device)
        sup = sup[sup < head.out_features]
    step = max(1, LOGIT_CHUNK_ELEMS // head.out_features)
    parts = []
    for hc, tc in zip(h.split(step), tgt.split(step), strict=True):
        if torch.is_grad_enabled() and hc.requires_grad:
            parts.append(
                torch.utils.checkpoint.checkpoint(
                    _head_logprobs, head, hc, tc, sup, temperature, entropy, use_reentrant=False
                )
            )
        else:
            parts.append(_head_logprobs(head, hc, tc, sup, temperature, entropy))
    zeros = torch.zeros(sel.shape, dtype=torch.float32, device=h.device)
    if not entropy:
        return zeros.masked_scatter(sel, torch.cat(parts)) if parts else zeros
    if not parts:
        return zeros, zeros.clone()
    lp, ent = zip(*parts, strict=True)
    return zeros.masked_scatter(sel, torch.cat(lp)), zeros.masked_scatter(sel, torch.cat(ent))
