"""The weight-sync seam: learner weights -> generation engines, one backend per transport (no Ray here).

Engine contract (what every receiver implements, HF and vLLM engines alike):

    engine.update_weights(named_tensors: dict[str, torch.Tensor], version: int) -> None

- called one or more times per sync, each time with one *bucket*: a subset of the parameters (partial
  loads must work); all buckets of one sync carry the same `version`, and the engine tags the trajectories
  it generates afterwards with it;
- names are the learner's `model.named_parameters()` names (transformers' own naming for the checkpoint's
  class); shapes are full (ZeRO-3 gathered); dtypes are the learner's (fp32 on CPU, bf16 on GPU);
- tensors are on CPU (object store, in-process) or on the engine's GPU (NCCL); they may be read-only views
  of a shared buffer, so the engine copies them (e.g. `param.data.copy_(t)`) and keeps no reference.
`load_named_tensors(model, named)` is that copy for a plain HF model.

Backends register by name (`register_sync_backend`); `make_sync_backend(cfg.sync, on_gpu)` picks one.
`in_process` lives here; `object_store`, `nccl` (plus `gloo`, the same collective path on CPU) and
`colocated` (CUDA IPC on a shared GPU) live in `pyvision_rl.actors.weight_sync` because they move data
between Ray actors. The first sync to an engine sends every parameter; later ones only the trainable ones
(engines are built from the learner's checkpoint, so the frozen vision tower never changes there).
"""

from __future__ import annotations

import math
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ParamMeta = tuple[str, str, tuple[int, ...]]  # (name, dtype name without "torch.", full shape)

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name.removeprefix("torch.")]


def meta_nbytes(m: ParamMeta) -> int:
    return math.prod(m[2]) * torch.empty((), dtype=torch_dtype(m[1])).element_size()


def plan_buckets(metadata: Sequence[ParamMeta], bucket_mb: int) -> list[list[ParamMeta]]:
    """Consecutive parameters grouped into buckets of at most `bucket_mb` MB (a larger tensor gets its own).

    Sender and receivers compute the same plan from the same metadata, so only the metadata travels."""
    limit = max(1, int(bucket_mb)) * 2**20
    buckets: list[list[ParamMeta]] = []
    cur: list[ParamMeta] = []
    size = 0
    for m in metadata:
        n = meta_nbytes(m)
        if cur and size + n > limit:
            buckets.append(cur)
            cur, size = [], 0
        cur.append(m)
        size += n
    if cur:
        buckets.append(cur)
    return buckets


@dataclass
class PackedBucket:
    """A bucket as one contiguous byte buffer plus (name, dtype, shape, offset, nbytes) entries.

    One numpy uint8 buffer travels through Ray's object store without copies (numpy is zero-copy there,
    torch tensors are pickled), and bf16 survives because only bytes are stored."""

    buffer: np.ndarray
    entries: list[tuple[str, str, tuple[int, ...], int, int]]

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)


def pack_bucket(named: Mapping[str, torch.Tensor]) -> PackedBucket:
    """Pack CPU tensors into one PackedBucket."""
    entries, parts, off = [], [], 0
    for name, t in named.items():
        t = t.detach().contiguous().cpu()
        b = t.reshape(-1).view(torch.uint8)
        entries.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), off, b.numel()))
        parts.append(b)
        off += b.numel()
    buf = torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.uint8)
    return PackedBucket(buf, entries)


def unpack_bucket(packed: PackedBucket) -> dict[str, torch.Tensor]:
    """Tensors viewing the bucket's buffer (no copy; read-only when the buffer came from the object store)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # non-writable numpy buffer: receivers copy anyway
        flat = torch.from_numpy(packed.buffer)
    out = {}
    for name, dtype, shape, off, nbytes in packed.entries:
        out[name] = flat[off : off + nbytes].view(torch_dtype(dtype)).view(shape)
    return out


def flatten_bucket(named: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """All tensors of a bucket as one uint8 tensor on their device (what a collective broadcasts)."""
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in named.values()])


def unflatten_bucket(flat: torch.Tensor, bucket: Sequence[ParamMeta]) -> dict[str, torch.Tensor]:
    """Views of a broadcast uint8 buffer as the bucket's tensors."""
    out, off = {}, 0
    for name, dtype, shape in bucket:
        n = meta_nbytes((name, dtype, shape))
        out[name] = flat[off : off + n].view(torch_dtype(dtype)).view(shape)
        off += n
    return out


@torch.no_grad()
def load_named_tensors(
    model: torch.nn.Module, named: Mapping[str, torch.Tensor] | Iterable, strict: bool = True
) -> int:
    """Copy tensors into `model`'s parameters/buffers by name (a partial set is fine); returns how many.

    `strict`: an unknown name or a shape mismatch raises (names must be `named_parameters()` names)."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    items = named.items() if isinstance(named, Mapping) else named
    n = 0
    for name, t in items:
        p = params.get(name)
        if p is None:
            if strict:
                raise KeyError(
                    f"update_weights: the model has no parameter '{name}' (learner and engine models differ?)"
                )
            continue
        if tuple(p.shape) != tuple(t.shape):
            raise ValueError(
                f"update_weights: '{name}' has shape {tuple(t.shape)}, the model's is {tuple(p.shape)}"
            )
        p.data.copy_(t.to(device=p.device, dtype=p.dtype))
        n += 1
    return n


# ----------------------------------------------------------------------------------------- the seam

WEIGHT_SYNC_BACKENDS: dict[str, type[WeightSyncBackend]] = {}


def register_sync_backend(name: str):
    """Class decorator: make a WeightSyncBackend available as `sync.backend=<name>`."""

    def deco(cls):
        cls.name = name
        WEIGHT_SYNC_BACKENDS[name] = cls
        return cls

    return deco


class WeightSyncBackend(ABC):
    """Moves the learner's weights to engines. `sync` returns stats: seconds, bytes, buckets, version."""

    name = "base"

    def __init__(self, bucket_mb: int = 256) -> None:
        self.bucket_mb = bucket_mb
        self._synced: set = set()  # engines that already got the frozen parameters

    def trainable_only(self, engines: Sequence[Any]) -> bool:
        """True when every engine already got a full sync from this backend (then mark them all as synced:
        call once per sync, before sending)."""
        keys = [getattr(e, "_actor_id", None) or id(e) for e in engines]
        done = all(k in self._synced for k in keys)
        self._synced.update(keys)
        return done

    @abstractmethod
    def sync(self, source: Any, engines: Sequence[Any], version: int) -> dict[str, float]:
        """Send the current weights of `source` (a learner or learner group) to every engine as `version`."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release transport resources (process groups)."""


@register_sync_backend("in_process")
class InProcessSync(WeightSyncBackend):
    """Same process: `source` is a PolicyLearner; engines are objects with `update_weights`."""

    def sync(self, source: Any, engines: Sequence[Any], version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        nbytes = buckets = 0
        for bucket in source.iter_weight_buckets(self.bucket_mb, trainable_only=self.trainable_only(engines)):
            buckets += 1
            nbytes += sum(t.numel() * t.element_size() for t in bucket.values())
            for e in engines:
                e.update_weights(bucket, version)
        return {
            "seconds": time.perf_counter() - t0,
            "bytes": float(nbytes),
            "buckets": float(buckets),
            "version": version,
        }
