"""PolicyLearner: one data-parallel rank of the GRPO learner on DeepSpeed ZeRO (no Ray inside).

Each rank trains on its share of the selected trajectories with the advantages the selection set on them
(`Trajectory.advantage`, computed over the full group before filtering); the loss is an exact
token-mean over all ranks' model tokens of a mini-batch: every micro-batch loss is Σ l·mask divided by the
global token count, times world_size (DeepSpeed averages gradients over ranks). Ranks agree on the number of
mini-batches and of micro-batches per mini-batch (padding with zero-weight batches) so ZeRO's collectives
line up. gloo on CPU, nccl on GPU; fp32 on CPU, bf16 on GPU; vision tower frozen by default.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pyvision_rl.config import LearnerConfig, ModelConfig
from pyvision_rl.learner.batching import MicroBatch, chunk, make_micro_batches
from pyvision_rl.learner.losses import kl_k3, masked_mean, policy_loss
from pyvision_rl.types import Trajectory

log = logging.getLogger("pyvision_rl.learner")


def free_port() -> int:
    """A free TCP port on this host (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world_size: int, backend: str | None = None) -> None:
    """Join the learner's process group (MASTER_ADDR/MASTER_PORT from the environment; a local free port for
    world size 1). Idempotent."""
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    elif "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise RuntimeError(
            f"learner rank {rank}/{world_size}: MASTER_ADDR and MASTER_PORT must be set (LearnerGroup does this)"
        )
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=os.environ.get("LOCAL_RANK", "0")
    )
    import deepspeed

    for attempt in range(5):
        try:
            deepspeed.init_distributed(
                dist_backend=backend, rank=rank, world_size=world_size, auto_mpi_discovery=False
            )
            return
        except Exception as e:
            # World size 1 has no peer that must agree on the port: when it is taken (another process took
            # free_port()'s choice before the bind, or MASTER_PORT was inherited from a parent that holds
            # it), any free port will do.
            if world_size != 1 or "EADDRINUSE" not in str(e) or attempt == 4:
                raise
            os.environ["MASTER_PORT"] = str(free_port())


class LogProbModule(torch.nn.Module):
    """The learner's root module: the policy plus its log-prob head (`models.processing.token_logprobs`).

    DeepSpeed wraps this, not the bare policy, so the chunked LM head runs inside the engine's forward:
    ZeRO-3 gathers its weight there and DeepSpeed's backward hooks sit on what the loss is built from.
    `policy` keeps the checkpoint's parameter names (weight sync, save).
    """

    def __init__(self, policy: torch.nn.Module, suppress_ids: torch.Tensor, temperature: float) -> None:
        super().__init__()
        self.policy = policy
        self.suppress_ids = suppress_ids
        self.temperature = temperature

    def forward(
        self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log-probs, entropy or None), each (B, L-1) and 0 outside `mask`."""
        from pyvision_rl.models.processing import token_logprobs

        out = token_logprobs(self.policy, inputs, self.suppress_ids, self.temperature, mask, entropy)
        return out if entropy else (out, None)


def _vision_module(model) -> torch.nn.Module | None:
    for path in ("visual", "model.visual"):
        m = model
        for part in path.split("."):
            m = getattr(m, part, None)
        if m is not None:
            return m
    return None


class PolicyLearner:
    """One learner rank. `train_step(trajs)` does `ppo_epochs` passes of mini-batch PPO on this rank's trajectories.

    `model_path`: a HF Qwen-VL checkpoint dir (`models.load_policy` loads it). `temperature` must be the
    sampler's (log-probs are of the tempered distribution). `device`: default cuda:<local rank> if CUDA,
    else cpu.
    """

    def __init__(
        self,
        model_path: str,
        learner_cfg: LearnerConfig | None = None,
        model_cfg: ModelConfig | None = None,
        rank: int = 0,
        world_size: int = 1,
        temperature: float = 1.0,
        device: str | None = None,
    ) -> None:
        import deepspeed

        from pyvision_rl.models.loading import load_policy
        from pyvision_rl.models.processing import suppressed_token_ids

        self.cfg = learner_cfg or LearnerConfig()
        self.model_cfg = model_cfg or ModelConfig()
        self.rank, self.world_size = rank, world_size
        self.temperature = temperature
        cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device(device or f"cuda:{local}")
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        init_process_group(rank, world_size, "nccl" if cuda else "gloo")
        dtype = self.model_cfg.dtype
        if dtype == "auto":
            dtype = "bfloat16" if cuda else "float32"
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        model, self.processor = load_policy(
            model_path,
            dtype=dtype,
            device="cpu",
            min_pixels=self.model_cfg.min_pixels,
            max_pixels=self.model_cfg.max_pixels,
        )
        self.model_path = model_path
        if self.model_cfg.freeze_vision:
            vis = _vision_module(model)
            if vis is None:
                raise RuntimeError(
                    f"{model_path}: model.freeze_vision is set but the model has no vision tower"
                )
            vis.requires_grad_(False)
        if self.model_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            # transformers then calls `enable_input_require_grads()`, which hooks every sub-model's input
            # embeddings, the frozen vision tower's patch embedding included: backward would run through the
            # whole ViT. Keep the hook on the text embeddings only.
            model.disable_input_require_grads()
            model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        model.config.use_cache = False
        suppress = torch.tensor(
            suppressed_token_ids(self.processor, model.get_input_embeddings().num_embeddings),
            dtype=torch.long,
        )
        self.suppress_ids = suppress.to(self.device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # torch's AdamW (its fused CUDA kernel ships with torch): DeepSpeed's FusedAdam would be JIT-built
        # against the local nvcc, which fails when that differs from torch's CUDA.
        optimizer = torch.optim.AdamW(
            trainable,
            lr=self.cfg.lr,
            weight_decay=self.cfg.weight_decay,
            betas=(0.9, 0.999),
            eps=1e-8,
            fused=cuda,
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=LogProbModule(model, self.suppress_ids, temperature),
            optimizer=optimizer,
            model_parameters=trainable,
            config=self._ds_config(model),
        )
        self.ref_model = None
        if self.cfg.kl_coef > 0:
            # The frozen reference is a plain (unpartitioned) copy on each rank.
            ref, _ = load_policy(model_path, dtype=dtype, device=str(self.device))
            self.ref_model = LogProbModule(ref.requires_grad_(False), self.suppress_ids, temperature)
        self.zero3_multi = self.cfg.zero_stage == 3 and world_size > 1
        self.steps = 0

    # ------------------------------------------------------------------ setup
    def _ds_config(self, model: torch.nn.Module) -> dict[str, Any]:
        """ZeRO settings sized from the hidden size as HF's DeepSpeed integration does for "auto": buckets
        of hidden^2 elements (at least DeepSpeed's 5e7: smaller prefetch buckets left a prefetched parameter
        in flight after an eval forward, seen with the tiny model), and parameters under 10 x hidden (norms,
        biases) kept whole on every rank instead of gathered one by one (0 makes each one a collective)."""
        text = getattr(model.config, "text_config", model.config)
        h = int(text.hidden_size)
        bucket = max(h * h, int(5e7))
        zero: dict[str, Any] = {"stage": self.cfg.zero_stage}
        if self.cfg.zero_stage >= 2:
            # overlap_comm on GPU only: gloo has no separate stream to overlap on.
            zero.update(
                overlap_comm=self.device.type == "cuda", contiguous_gradients=True, reduce_bucket_size=bucket
            )
        if self.cfg.zero_stage == 3:
            zero.update(
                stage3_param_persistence_threshold=10 * h,
                stage3_prefetch_bucket_size=bucket,
                stage3_max_live_parameters=int(1e9),
                stage3_max_reuse_distance=int(1e9),
            )
        return {
            "train_micro_batch_size_per_gpu": 1,  # batching is ours; DeepSpeed only needs a consistent value
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.cfg.grad_clip if self.cfg.grad_clip > 0 else 0.0,
            "zero_optimization": zero,
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    @property
    def model(self) -> torch.nn.Module:
        """The policy (HF model) inside the DeepSpeed engine; its parameters are partitioned under ZeRO-3."""
        return self.engine.module.policy

    # ------------------------------------------------------------------ collectives
    def _all_reduce(self, values: Sequence[float] | dict[str, float], op=None) -> Any:
        """Sum (or `op`) over ranks of a list of numbers, or of a dict's values by name."""
        if isinstance(values, dict):
            return dict(zip(values, self._all_reduce(list(values.values()), op), strict=True))
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(
            list(values), dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu"
        )
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t.tolist()

    # ------------------------------------------------------------------ batching across ranks
    def _plan(self, trajs: Sequence[Trajectory], advantages: torch.Tensor) -> list[list[MicroBatch]]:
        """Mini-batches (agreed count across ranks) of micro-batches (agreed count per mini-batch)."""
        mbs = max(1, self.cfg.micro_batch_size)
        n_global = int(self._all_reduce([len(trajs)])[0])
        if n_global == 0:
            return []
        n_mini = (
            1 if self.cfg.mini_batch_size <= 0 else max(1, math.ceil(n_global / self.cfg.mini_batch_size))
        )
        idx_chunks = chunk(list(range(len(trajs))), n_mini)
        need = [math.ceil(len(c) / mbs) for c in idx_chunks]
        agreed = self._all_reduce(need, dist.ReduceOp.MAX)
        return [
            make_micro_batches(
                self.processor,
                [trajs[i] for i in c],
                advantages[c],
                mbs,
                n_micro=max(int(n_micro), 1),
                add_dummy_image=self.zero3_multi,
            )
            for c, n_micro in zip(idx_chunks, agreed, strict=True)
        ]

    def _run(self, plan: list[list[MicroBatch]], micro, epochs: int = 1, train: bool = True):
        """The one mini-batch loop: `micro(mb, d, denom)` on every micro-batch `mb` of `plan` (`d`: its copy on
        the device), `epochs` times over. With `train`, `micro` returns the loss to backward and each
        mini-batch is one optimizer step (its last micro-batch is DeepSpeed's accumulation boundary); `denom`
        is the mini-batch's global model-token count / world size, so Σ l·mask / denom is an exact token-mean
        once DeepSpeed averages gradients over ranks. Without, the engine is in eval mode and `denom` is 1.
        Returns (model tokens seen on this rank, the grad norm of each optimizer step)."""
        tokens, norms = 0.0, []
        self.engine.train(train)
        for _ in range(epochs):
            for mini in plan:
                denom = 1.0
                if train:
                    denom = max(self._all_reduce([sum(mb.n_tokens for mb in mini)])[0], 1.0) / self.world_size
                for k, mb in enumerate(mini):
                    if train:
                        self.engine.set_gradient_accumulation_boundary(k == len(mini) - 1)
                    loss = micro(mb, mb.to(self.device), denom)
                    if train:
                        self.engine.backward(loss, scale_wrt_gas=False)
                        self.engine.step()
                    tokens += mb.n_tokens
                if train and (gn := self.engine.get_global_grad_norm()) is not None:
                    norms.append(float(gn))
        self.engine.train()
        return tokens, norms

    @torch.no_grad()
    def _fill_old_logp(self, plan: list[list[MicroBatch]]) -> float:
        """Set every micro-batch's old log-probs: the sampler's, or recomputed by the policy before the
        update (`learner.recompute_old_logprobs`); returns the mean |recomputed - sampler's| per model token."""
        s = {"diff": 0.0}

        def micro(mb, d, denom):
            mb.old_logp = mb.rollout_logp
            if self.cfg.recompute_old_logprobs:
                logp, _ = self.engine(d.inputs, d.mask)
                mb.old_logp = (logp.float().cpu() * mb.mask).detach()
                s["diff"] += float(((mb.old_logp - mb.rollout_logp).abs() * mb.mask).sum())

        n, _ = self._run(plan, micro, train=False)
        return s["diff"] / n if n else 0.0

    # ------------------------------------------------------------------ steps
    def train_step(self, trajs: Sequence[Trajectory] | Sequence[Sequence[Trajectory]]) -> dict[str, float]:
        """PPO on this rank's trajectories (`Trajectory.advantage` set). Every rank must call it (collectives).

        Returns metrics averaged over ranks: loss, pg_loss, clip_frac, dual_clip_frac, approx_kl, entropy
        (only with learner.entropy_coef > 0: it costs a softmax over the vocabulary per token), kl_ref,
        grad_norm, tokens (model tokens), seq_tokens, trajectories, adv_abs_mean, rollout_logp_abs_diff, lr, time_s.
        """
        t0 = time.perf_counter()
        cfg = self.cfg
        flat = [t for x in trajs for t in (x if isinstance(x, (list, tuple)) else [x])]
        # The selection's full-group advantages (rewards.filters.select_for_training), never recomputed over
        # the survivors; std_norm divides by the full group's std as the release does.
        adv = torch.tensor(
            [t.advantage / (t.group_std + 1e-6) if cfg.std_norm else t.advantage for t in flat],
            dtype=torch.float32,
        )
        plan = self._plan(flat, adv)
        if not plan:
            return {"trajectories": 0.0}
        want_entropy = cfg.entropy_coef > 0
        # Token-weighted sums on this rank, reduced over ranks by name and divided by the token total.
        names = ("loss", "pg_loss", "clip_frac", "dual_clip_frac", "approx_kl", "entropy", "kl_ref")
        per_tok = {k: 0.0 for k in names if k != "entropy" or want_entropy}
        sums = {
            "rollout_logp_abs_diff": self._fill_old_logp(plan),
            "trajectories": float(len(flat)),
            "adv_abs": float(adv.abs().sum()),
            "seq_tokens": float(sum(t.length for t in flat)),  # whole sequences: the forward's work
        }

        def micro(mb, d, denom):
            logp, ent = self.engine(d.inputs, d.mask, want_entropy)
            pg, m = policy_loss(
                logp, d.old_logp, d.advantages, d.mask, cfg.clip_low, cfg.clip_high, cfg.dual_clip, denom
            )
            loss = pg
            if want_entropy:
                loss = loss - cfg.entropy_coef * masked_mean(ent, d.mask, denom)
                per_tok["entropy"] += float((ent.detach() * d.mask).sum())
            if self.ref_model is not None:
                with torch.no_grad():
                    ref_logp, _ = self.ref_model(d.inputs, d.mask)
                kl = masked_mean(kl_k3(logp, ref_logp), d.mask, denom)
                loss = loss + cfg.kl_coef * kl
                per_tok["kl_ref"] += kl.item() * denom
            per_tok["loss"] += loss.item() * denom
            per_tok["pg_loss"] += pg.item() * denom
            for key in ("clip_frac", "dual_clip_frac", "approx_kl"):
                per_tok[key] += m[key] * mb.n_tokens
            return loss

        sums["tokens"], grad_norms = self._run(plan, micro, cfg.ppo_epochs)
        r = self._all_reduce({**per_tok, **sums})
        out = {k: r[k] / max(r["tokens"], 1.0) for k in per_tok}
        out.update(
            tokens=r["tokens"] / cfg.ppo_epochs,
            trajectories=r["trajectories"],
            adv_abs_mean=r["adv_abs"] / max(r["trajectories"], 1.0),
            seq_tokens=r["seq_tokens"],
            grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else 0.0,
            rollout_logp_abs_diff=r["rollout_logp_abs_diff"] / self.world_size,
            lr=float(self.optimizer.param_groups[0]["lr"]),
            time_s=time.perf_counter() - t0,
        )
        self.steps += 1
        return out

    def _nll(self, trajs: Sequence[Trajectory], train: bool) -> tuple[float, float]:
        """(token-mean negative log-likelihood, count) of the model tokens over all ranks; with `train`, one
        optimizer step per mini-batch on it."""
        s = {"loss": 0.0}

        def micro(mb, d, denom):
            logp, _ = self.engine(d.inputs, d.mask)
            loss = masked_mean(-logp, d.mask, denom)
            s["loss"] += loss.item() * denom
            return loss

        tokens, _ = self._run(self._plan(list(trajs), torch.zeros(len(trajs))), micro, train=train)
        r = self._all_reduce({**s, "tokens": tokens})
        return r["loss"] / max(r["tokens"], 1.0), r["tokens"]

    def sft_step(self, trajs: Sequence[Trajectory], lr: float | None = None) -> dict[str, float]:
        """One optimizer step of cross-entropy on model tokens (loss_mask) only: the SFT cold start.

        `lr` (e.g. sft.lr) overrides the optimizer's learning rate from now on. Every rank must call it.
        """
        if lr is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
        loss, tokens = self._nll(trajs, train=True)
        return {"sft_loss": loss, "tokens": tokens}

    @torch.no_grad()
    def eval_loss(self, trajs: Sequence[Trajectory]) -> float:
        """Token-mean negative log-likelihood of the model tokens (no update). Every rank must call it."""
        return self._nll(trajs, train=False)[0]

    @torch.no_grad()
    def model_token_logprobs(self, trajs: Sequence[Trajectory]) -> list[torch.Tensor]:
        """The learner's log-prob of each model token (loss_mask == 1) of each trajectory, in order.

        For diagnostics (sampler vs learner agreement) and tests. Every rank must call it under ZeRO-3.
        """
        self.engine.eval()
        out = []
        for t in trajs:
            (mb,) = make_micro_batches(self.processor, [t], [0.0], 1, add_dummy_image=self.zero3_multi)
            d = mb.to(self.device)
            logp, _ = self.engine(d.inputs, d.mask)
            out.append(logp[0][d.mask[0] > 0].float().cpu())
        self.engine.train()
        return out

    # ------------------------------------------------------------------ weights out
    @contextmanager
    def _gathered(self, params: list[torch.nn.Parameter]) -> Iterator[None]:
        if self.cfg.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield
        else:
            yield

    def param_metadata(self, trainable_only: bool = False) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, full shape) of every parameter (`trainable_only`: those the optimizer updates, i.e.
        not the frozen vision tower), in sync order (names as in `named_parameters`)."""
        out = []
        for name, p in self.model.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            out.append((name, str(p.dtype).removeprefix("torch."), shape))
        return out

    def iter_weight_buckets(
        self, bucket_mb: int = 256, device: str | None = None, trainable_only: bool = False
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Full (ZeRO-3 gathered) parameters in buckets of about `bucket_mb` MB, as {name: tensor} copies.

        Buckets follow `weight_sync.plan_buckets(self.param_metadata(trainable_only), bucket_mb)`; engines
        built from the same checkpoint already hold the frozen parameters, so syncs after the first skip them
        (the ViT is ~1.3 GB of a 7B model). Every rank must iterate
        it in lockstep under ZeRO-3 (the gathers are collective); only rank 0's copies are used. `device`
        (default cpu) is where the copies go ("cuda" keeps them on the GPU for a broadcast).
        """
        from pyvision_rl.learner.weight_sync import plan_buckets

        params = dict(self.model.named_parameters())
        for bucket in plan_buckets(self.param_metadata(trainable_only), bucket_mb):
            group = [params[name] for name, _, _ in bucket]
            with self._gathered(group):
                yield {
                    name: p.data.detach().to(device or "cpu", copy=True)
                    for (name, _, _), p in zip(bucket, group, strict=True)
                }

    def state_dict_for_sync(self) -> dict[str, torch.Tensor]:
        """All parameters, ZeRO-3 gathered, on CPU. Every rank must call it under ZeRO-3."""
        out: dict[str, torch.Tensor] = {}
        for bucket in self.iter_weight_buckets():
            out.update(bucket)
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str) -> None:
        """`path/model`: a HF checkpoint dir (rank 0; loadable by transformers / models.load_policy);
        `path/learner`: the DeepSpeed state (model partitions + optimizer) of every rank. Call on all ranks."""
        out = Path(path)
        sd = self.state_dict_for_sync()
        if self.rank == 0:
            (out / "model").mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(out / "model", state_dict=sd, safe_serialization=True)
            self.processor.save_pretrained(out / "model")
            self.processor.tokenizer.save_pretrained(out / "model")
        self.engine.save_checkpoint(str(out / "learner"), tag="state", client_state={"steps": self.steps})
        self.barrier()

    def load(self, path: str) -> None:
        """Restore the DeepSpeed state written by `save` (weights, optimizer). Call on all ranks."""
        d = Path(path) / "learner"
        if not (d / "state").is_dir():
            raise FileNotFoundError(f"{d}/state: no learner checkpoint here (written by PolicyLearner.save)")
        _, client = self.engine.load_checkpoint(str(d), tag="state", load_optimizer_states=True)
        self.steps = int((client or {}).get("steps", 0))

    def barrier(self) -> None:
        if dist.is_initialized() and self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Barrier then leave the process group (without the barrier ~1 in 8 world-size-2 runs SIGABRT)."""
        if dist.is_initialized():
            if self.world_size > 1:
                dist.barrier()
            dist.destroy_process_group()
