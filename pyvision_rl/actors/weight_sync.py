"""Ray weight-sync backends behind `pyvision_rl.learner.weight_sync` (the seam and the engine contract).

- `object_store`: learner rank 0 packs buckets into contiguous byte buffers and `ray.put`s them; each
  engine actor fetches them itself (the driver only moves refs) and calls `update_weights(bucket, version)`.
- `nccl`: learner rank 0 and every engine join a second process group (TCPStore on rank 0's node) once; each
  sync broadcasts the gathered buckets from rank 0 straight into the engines' GPUs. `gloo` is the same
  code on CPU (tests run it here). Importable without a GPU: NCCL is only touched when used.
- `colocated`: learner rank i and engine i share a GPU (`learner.placement=colocated`). Under ZeRO-3 every
  rank gathers each bucket anyway, so each rank hands its own copy to its own engine: on GPU a CUDA IPC
  handle of the bucket's buffer (the engine maps the learner's memory and copies from it; no NCCL, no
  host round trip), on CPU the packed bytes by value. The rank frees a bucket only after its engine is done.

Code runs inside an engine actor through Ray's `__ray_call__`, so an engine actor only needs the
`update_weights(named_tensors, version)` method; a plain in-process engine object works too.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist

from pyvision_rl.learner.weight_sync import (
    WEIGHT_SYNC_BACKENDS,
    PackedBucket,
    ParamMeta,
    WeightSyncBackend,
    meta_nbytes,
    plan_buckets,
    register_sync_backend,
    unflatten_bucket,
    unpack_bucket,
)


def nccl_env() -> dict[str, str]:
    """NCCL settings for every learner and engine actor (their `runtime_env`), identical on both sides of a
    weight-sync group. vLLM used to turn NCCL's cuMem allocator off in its workers (NCCL_CUMEM_ENABLE=0) and
    a learner with it on then failed or hung in the broadcast (NVSwitch machines; SkyRL set the same value
    on both sides to fix it). NCCL 2.22.3 fixed the underlying bug and newer vLLM leaves it on, but mixed
    settings still differ in memory use, so one value everywhere: the driver's if set, else 0, plus every
    other NCCL_* variable of the driver (interfaces, IB HCAs, debug)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
    env.setdefault("NCCL_CUMEM_ENABLE", "0")
    return env


_GROUP_ATTR = "_pyvision_weight_group"


def _call_on(engine: Any, fn, *args):
    """Run `fn(engine, *args)` inside the engine's actor (a ref back) or in-process (a value)."""
    if hasattr(engine, "__ray_call__"):
        return engine.__ray_call__.remote(fn, *args)
    return fn(engine, *args)


def _get(x: list) -> list:
    refs = [r for r in x if isinstance(r, ray.ObjectRef)]
    return ray.get(refs) if refs else x


# ----------------------------------------------------------------------------------------- object store


def apply_packed_buckets(engine: Any, bucket_refs: list, version: int) -> int:
    """Engine side: fetch each bucket (one at a time, bounding memory) and hand it to update_weights."""
    n = 0
    for ref in bucket_refs:
        packed: PackedBucket = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
        engine.update_weights(unpack_bucket(packed), version)
        n += packed.nbytes
    return n


@register_sync_backend("object_store")
class ObjectStoreSync(WeightSyncBackend):
    """CPU path. `source` is a LearnerGroup (its actors publish) or anything with `publish_weights(bucket_mb)`."""

    def sync(self, source: Any, engines: Sequence[Any], version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        actors = getattr(source, "actors", None)
        trainable = self.trainable_only(engines)
        if actors is not None:  # every rank joins the ZeRO-3 gathers; rank 0 returns the refs
            refs = ray.get([a.publish_weights.remote(self.bucket_mb, trainable) for a in actors])[0]
        else:
            refs = source.publish_weights(self.bucket_mb, trainable)
        n_buckets = len(refs)
        nbytes = _get([_call_on(e, apply_packed_buckets, refs, version) for e in engines])
        del refs  # the buckets leave the object store once the engines are done
        return {
            "seconds": time.perf_counter() - t0,
            "bytes": float(nbytes[0]) if nbytes else 0.0,
            "buckets": float(n_buckets),
            "version": version,
        }


# ----------------------------------------------------------------------------------------- collectives


def free_address() -> tuple[str, int]:
    """This node's IP and a free port (for the weight-sync TCPStore on learner rank 0)."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def new_process_group(
    addr: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float = 600.0
):
    """A process group independent of the default one (the learner's DeepSpeed group stays untouched)."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(addr, port, world_size, is_master=rank == 0, timeout=timeout)
    prefix = dist.PrefixStore(f"pyvision_weight_sync_{port}", store)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(prefix, rank, world_size, opts)
    elif backend == "gloo":
        pg = dist.ProcessGroupGloo(prefix, rank, world_size, timeout)
    else:
        raise ValueError(f"weight sync backend {backend!r}: use nccl (GPU) or gloo (CPU)")
    return pg


def broadcast(pg, tensor: torch.Tensor, root: int = 0) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = root
    pg.broadcast([tensor], opts).wait()


def join_group(engine: Any, addr: str, port: int, rank: int, world_size: int, backend: str) -> bool:
    """Engine side: join the weight-sync group (kept on the engine object)."""
    setattr(engine, _GROUP_ATTR, (new_process_group(addr, port, rank, world_size, backend), backend))
    return True


def has_group(engine: Any) -> bool:
    return getattr(engine, _GROUP_ATTR, None) is not None


def receive_broadcast(engine: Any, buckets: list[list[ParamMeta]], version: int) -> int:
    """Engine side: receive every bucket from learner rank 0 and hand it to update_weights."""
    pg, backend = getattr(engine, _GROUP_ATTR)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    n = 0
    for bucket in buckets:
        flat = torch.empty(sum(meta_nbytes(m) for m in bucket), dtype=torch.uint8, device=device)
        broadcast(pg, flat)
        engine.update_weights(unflatten_bucket(flat, bucket), version)
        n += flat.numel()
    return n


class CollectiveSync(WeightSyncBackend):
    """Broadcast from learner rank 0 (rank 0 of the sync group) to engines 1..E. `source` is a LearnerGroup."""

    backend = "nccl"

    def __init__(self, bucket_mb: int = 256) -> None:
        super().__init__(bucket_mb)
        self._engine_ids: list[Any] | None = None
        self.metadata: dict[bool, list[ParamMeta]] = {}  # trainable_only -> metadata

    def _setup(self, source: Any, engines: Sequence[Any]) -> None:
        rank0 = source.actors[0]
        addr, port = ray.get(rank0.weight_sync_address.remote())
        world = 1 + len(engines)
        calls = [rank0.join_weight_group.remote(addr, port, world, self.backend)]
        calls += [
            _call_on(e, join_group, addr, port, i + 1, world, self.backend) for i, e in enumerate(engines)
        ]
        _get(calls)
        self.metadata = dict(
            zip((False, True), ray.get([rank0.param_metadata.remote(t) for t in (False, True)]), strict=True)
        )
        self._synced.clear()  # a new group: the engines get everything once more
        self._engine_ids = [id(e) if not hasattr(e, "_actor_id") else e._actor_id for e in engines]

    def sync(self, source: Any, engines: Sequence[Any], version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        ids = [id(e) if not hasattr(e, "_actor_id") else e._actor_id for e in engines]
        # A restarted engine actor lost its group: set the whole group up again.
        if ids != self._engine_ids or not all(_get([_call_on(e, has_group) for e in engines])):
            self._setup(source, engines)
        trainable = self.trainable_only(engines)
        buckets = plan_buckets(self.metadata[trainable], self.bucket_mb)
        recv = [_call_on(e, receive_broadcast, buckets, version) for e in engines]
        send = [a.broadcast_weights.remote(self.bucket_mb, trainable) for a in source.actors]
        got = _get(recv + send)
        return {
            "seconds": time.perf_counter() - t0,
            "bytes": float(got[0]) if engines else 0.0,
            "buckets": float(len(buckets)),
            "version": version,
        }


@register_sync_backend("nccl")
class NcclSync(CollectiveSync):
    """GPU: NCCL broadcast of ZeRO-3-gathered, bucketed parameters into the engines' GPU memory."""

    backend = "nccl"


@register_sync_backend("gloo")
class GlooSync(CollectiveSync):
    """The collective path over gloo on CPU (tests and CPU clusters without a shared object store)."""

    backend = "gloo"


# ----------------------------------------------------------------------------------------- colocated


def receive_colocated(engine: Any, payload: Any, bucket: list[ParamMeta], version: int) -> int:
    """Engine side: map the bucket (a CUDA IPC handle of the rank's buffer, or packed bytes), load it,
    and wait for the copies, since the rank frees the buffer as soon as this returns."""
    if isinstance(payload, PackedBucket):
        engine.update_weights(unpack_bucket(payload), version)
        return payload.nbytes
    rebuild, args = payload  # torch.multiprocessing.reductions.reduce_tensor of the flat bucket
    flat = rebuild(*args)
    engine.update_weights(unflatten_bucket(flat, bucket), version)
    torch.cuda.synchronize(flat.device)
    return flat.numel()


def colocated_payload(named: dict[str, torch.Tensor]) -> tuple[Any, list[ParamMeta], Any]:
    """Learner side: (what travels to the colocated engine for one bucket, the bucket's metadata, the
    buffer the caller must keep alive until the engine has copied from it)."""
    from pyvision_rl.learner.weight_sync import flatten_bucket, pack_bucket

    meta = [(k, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in named.items()]
    if next(iter(named.values())).is_cuda:
        from torch.multiprocessing.reductions import reduce_tensor

        flat = flatten_bucket(named)
        return reduce_tensor(flat), meta, flat
    return pack_bucket(named), meta, None


@register_sync_backend("colocated")
class ColocatedSync(WeightSyncBackend):
    """Rank i -> engine i on the same GPU. `source` is a LearnerGroup; `engines[i]` sits on rank i's GPU
    (`learner.placement=colocated`: as many engines as ranks)."""

    def sync(self, source: Any, engines: Sequence[Any], version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        actors = source.actors
        if len(engines) != len(actors):
            raise ValueError(
                f"colocated weight sync: {len(engines)} engines for {len(actors)} learner ranks; with "
                "learner.placement=colocated set rollout.num_workers = learner.world_size"
            )
        trainable = self.trainable_only(engines)
        got = ray.get(
            [
                a.push_colocated.remote(e, self.bucket_mb, trainable, version)
                for a, e in zip(actors, engines, strict=True)
            ]
        )
        return {
            "seconds": time.perf_counter() - t0,
            "bytes": float(got[0][0]) if got else 0.0,
            "buckets": float(got[0][1]) if got else 0.0,
            "version": version,
        }


def make_sync_backend(
    backend: str, bucket_mb: int = 256, on_gpu: bool | None = None, colocated: bool = False
) -> WeightSyncBackend:
    """Backend by name (`sync.backend`); 'auto' is colocated for a colocated placement, else nccl when the
    learner is on GPU and object_store on CPU."""
    if backend == "auto":
        on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
        backend = "colocated" if colocated else "nccl" if on_gpu else "object_store"
    if backend not in WEIGHT_SYNC_BACKENDS:
        raise ValueError(
            f"sync.backend={backend!r} is unknown; choose one of {sorted(WEIGHT_SYNC_BACKENDS)} or 'auto'"
        )
    return WEIGHT_SYNC_BACKENDS[backend](bucket_mb)
