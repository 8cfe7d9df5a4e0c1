"""The driver: pipelined oversample -> filter -> rank -> learn -> sync loop over Ray actors.

The driver holds ObjectRefs and small per-trajectory summaries, never trajectories or tensors.
One step:
  1. chunks of `rollout.gen_batch_size` prompts x `rollout.n` go to the RolloutWorkers (split across them);
     up to `num_workers + 1` sub-batches are in flight; each worker streams back every group the moment
     it completes, and the driver sends it straight to the RewardService, so scoring overlaps rollouts;
  2. the RewardService verifies, adds the tool bonus, sets advantages, filters, and returns summaries plus
     the scored trajectories as returns of the driver's own call: the driver owns every trajectory ref,
     so a RewardService that dies after scoring loses nothing (a group is only scored again);
  3. once `trainer.train_batch_size x rollout.n` trajectories survived (or `max_chunks_per_step` chunks were
     used, if set), `rewards.filters.select_for_training` keeps those with the largest group std (groups may
     split, as in the release) and they go to the learner, which trains and syncs weights.
A dead RolloutWorker/SandboxPool/RewardService is restarted by Ray (max_restarts) and the sub-batches
it held are re-queued with the same seed; each such event is logged and counted.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pyvision_rl.config import Config, ConfigError, dump_config
from pyvision_rl.cursor import PromptCursor
from pyvision_rl.evaluate import SETTINGS_FILE, training_settings
from pyvision_rl.metrics import CollapseMonitor, MetricsLogger, summarize_rollouts
from pyvision_rl.types import Task

log = logging.getLogger("pyvision_rl")

CKPT_PREFIX = "step_"
COMPLETE = "COMPLETE"


# ----------------------------------------------------------------------------------------- preparation
def prepare_model(cfg: Config) -> str:
    """Path of the policy checkpoint: `model.path`, or the tiny model built into the run dir."""
    if cfg.model.path:
        p = Path(cfg.model.path)
        if not (p / "config.json").is_file():
            raise ConfigError(
                f"model.path={p} is not a Hugging Face checkpoint directory (no config.json). "
                "Point it at a Qwen-VL checkpoint, or leave it empty to build the tiny model."
            )
        return str(p)
    from pyvision_rl.data.synthetic import extra_tokenizer_corpus
    from pyvision_rl.models import tiny

    out = cfg.run_dir() / "tiny_model"
    if not (out / "config.json").is_file():
        # a synthetic family outside the shared tokenizer corpus (video_moment) gets its own vocabulary
        extra = [] if cfg.data.train_path else extra_tokenizer_corpus(cfg.data.synthetic.kind)
        tiny.make_tiny_model(out, cfg.model.tiny, seed=cfg.run.seed, extra_corpus=extra or None)
    return str(out)


def prepare_data(cfg: Config) -> tuple[list[Task], list[Task]]:
    """Training and held-out tasks: from `data.*_path`, or the synthetic generator into <run>/data."""
    from pyvision_rl.data import load_tasks

    train_path, eval_path = cfg.data.train_path, cfg.data.eval_path
    if not train_path:
        from pyvision_rl.data import synthetic

        s = cfg.data.synthetic
        out = cfg.run_dir() / "data"
        tp, ep = out / "train.jsonl", out / "eval.jsonl"
        if not (tp.is_file() and ep.is_file()):
            tp, ep = synthetic.make_dataset(out, s.kind, s.n_train, s.n_eval, s.seed)
        train_path = str(tp)
        eval_path = eval_path or str(ep)
    stats: dict[str, Any] = {}
    train = load_tasks(train_path, skip_bad=cfg.data.skip_bad_rows, stats=stats)
    if stats.get("skipped"):
        log.warning("skipped %d bad rows in %s: %s", stats["skipped"], train_path, stats.get("reasons"))
    held_out = load_tasks(eval_path, skip_bad=cfg.data.skip_bad_rows) if eval_path else []
    if not train:
        raise ConfigError(f"data.train_path={train_path}: no usable rows")
    return train, held_out


# ----------------------------------------------------------------------------------------- checkpoints
def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted(
        (p for p in (run_dir / "checkpoints").glob(f"{CKPT_PREFIX}*") if (p / COMPLETE).exists()),
        key=lambda p: int(p.name[len(CKPT_PREFIX) :]),
    )
    return ckpts[-1] if ckpts else None


def resolve_resume(cfg: Config) -> Path | None:
    r = cfg.run.resume
    if r == "never":
        return None
    if r == "auto":
        return latest_checkpoint(cfg.run_dir())
    p = Path(r)
    if not (p / COMPLETE).exists():
        raise ConfigError(f"run.resume={r}: not a complete checkpoint directory (no {COMPLETE} marker).")
    return p


def _rng_state() -> dict[str, Any]:
    import torch

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state().tolist(),
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    import torch

    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = s["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))


# ----------------------------------------------------------------------------------------- the driver
@dataclass
class _Scoring:
    """One streamed group being scored: its rollout ref and the refs the scoring call returns."""

    group_ref: Any
    traj_refs: list
    service: int
    tries: int = 1
    unavailable_since: float = 0.0  # when the service first answered "temporarily unavailable"


@dataclass
class _SubBatch:
    """A slice of a chunk assigned to one worker; kept until all its groups are scored, so it can be
    re-queued whole."""

    chunk: int
    groups: list[tuple[Task, int, str]]
    seed: int
    cursor_start: dict[str, int] = field(default_factory=dict)
    carried: bool = False  # sampled during the previous step: must be used now (staleness stays <= 1)
    worker: int = -1
    ref: Any = None  # the worker's ObjectRefGenerator: one ref per finished group, owned by the driver
    attempts: int = 0
    stream_done: bool = False
    scoring: dict[Any, _Scoring] = field(default_factory=dict)  # report ref -> group being scored
    results: list[tuple[dict, Any, list]] = field(default_factory=list)  # (report, group ref, traj refs)


@dataclass
class _StepState:
    accepted: list[tuple[int, float, Any]] = field(default_factory=list)  # (summary index, group std, ref)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    drops: dict[str, int] = field(default_factory=dict)
    judge: dict[str, int] = field(default_factory=dict)  # judged answers and judge failures
    rollouts: list[tuple[int, Any]] = field(default_factory=list)  # (first summary index, rollout ref)
    chunks: int = 0
    t_rollout_wait: float = 0.0

    def add(self, sb: _SubBatch) -> None:
        """Take a fully scored sub-batch's groups, in chunk order (whatever order they were scored in)."""
        order = {gid: k for k, (_, _, gid) in enumerate(sb.groups)}
        for res, group_ref, traj_refs in sorted(
            sb.results, key=lambda r: order.get(r[0]["summaries"][0]["group_id"], 0)
        ):
            base = len(self.summaries)
            self.accepted.extend((base + i, std, traj_refs[i]) for i, std in res["accepted"])
            self.summaries.extend(res["summaries"])
            self.rollouts.append((base, group_ref))
            for into, counts in ((self.judge, res.get("judge", {})), (self.drops, res["drops"])):
                for k, v in counts.items():
                    into[k] = into.get(k, 0) + v


class Trainer:
    """Owns the actors and runs `fit()`. Construct with a validated `Config`."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = cfg.run_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        self.events: dict[str, int] = {
            "worker_restarts": 0,
            "requeued_subbatches": 0,
            "reward_restarts": 0,
            "learner_rebuilds": 0,
        }
        self.step = 0
        self.version = 0
        self.chunk_seq = 0
        self._carry: list[_SubBatch] = []
        self._next_worker = 0
        self.resume_from = resolve_resume(cfg)
        self.model_path = prepare_model(cfg)
        self.train_tasks, self.eval_tasks = prepare_data(cfg)
        self.cursor = PromptCursor(len(self.train_tasks), cfg.run.seed, cfg.data.shuffle)
        self.monitor = CollapseMonitor(cfg.logging.collapse_threshold, cfg.logging.collapse_patience)
        policy_path = self.model_path
        state: dict[str, Any] | None = None
        if self.resume_from is not None:
            state = json.loads((self.resume_from / "trainer_state.json").read_text())
            policy_path = str(self.resume_from / "model")
            self.step, self.version = state["step"], state["version"]
            self.cursor.load_state(state["cursor"])
            self.chunk_seq = int(state.get("chunk_seq", 0))
            self.events.update(state.get("events", {}))
            _set_rng_state(state["rng"])
            log.info("resuming from %s (step %d)", self.resume_from, self.step)
        else:
            random.seed(cfg.run.seed)
            np.random.seed(cfg.run.seed)
        self._start_actors(policy_path)
        if self.resume_from is not None:
            self.learners.load(str(self.resume_from))
        self.logger = MetricsLogger(self.run_dir, cfg, resume_step=self.step, sink=RayGauges(cfg.run.name))

    # ------------------------------------------------------------------ actors
    def _start_actors(self, policy_path: str) -> None:
        import ray

        from pyvision_rl.actors.learner import LearnerGroup, colocated_placement, in_bundle
        from pyvision_rl.actors.reward import RewardService
        from pyvision_rl.actors.rollout import RolloutWorker
        from pyvision_rl.actors.sandbox import SandboxPool
        from pyvision_rl.actors.weight_sync import nccl_env

        cfg = self.cfg
        init_ray(cfg)
        check_resources(cfg)
        restarts = cfg.trainer.max_actor_restarts
        cfg_dict = cfg.model_dump(mode="json")
        self.pools = [
            SandboxPool.options(
                num_cpus=cfg.ray.sandbox_num_cpus,
                resources=dict(cfg.ray.sandbox_resources) or None,
                max_restarts=restarts,
                max_task_retries=0,
            ).remote(cfg.sandbox.model_dump(mode="json"))
            for _ in range(cfg.sandbox.num_pools)
        ]
        # colocated: worker i and learner rank i share bundle i (one GPU) of one placement group
        self.colocated = cfg.learner.placement == "colocated"
        pg = colocated_placement(cfg) if self.colocated else None
        self.workers = [
            RolloutWorker.options(
                num_cpus=cfg.rollout.worker_num_cpus,
                num_gpus=cfg.rollout.worker_num_gpus,
                max_restarts=restarts,
                runtime_env={"env_vars": nccl_env()},  # the learner's NCCL settings (weight-sync group)
                **in_bundle(pg, i),
            ).remote(policy_path, cfg_dict, self.pools)
            for i in range(cfg.rollout.num_workers)
        ]
        self.rewards = [
            RewardService.options(
                num_cpus=cfg.ray.reward_num_cpus,
                resources=dict(cfg.ray.reward_resources) or None,
                max_restarts=restarts,
            ).remote(cfg.reward.model_dump(mode="json"), cfg.rollout.n)
            for _ in range(cfg.reward.num_services)
        ]
        # service index -> pid of its last report, from the start: a restart before its first report still counts
        self._reward_pids: dict[int, Any] = {
            i: p["pid"] for i, p in enumerate(ray.get([r.ping.remote() for r in self.rewards]))
        }
        self._pg = pg
        self.learners = LearnerGroup(policy_path, cfg, placement_group=pg)
        self._worker_pids = {
            i: p["pid"] for i, p in enumerate(ray.get([w.ping.remote() for w in self.workers]))
        }
        if self.version:
            ray.get([w.set_version.remote(self.version) for w in self.workers])

    # ------------------------------------------------------------------ rollouts
    def _new_chunk(self) -> list[_SubBatch]:
        """Take the next `gen_batch_size` prompts as chunk number `self.chunk_seq`, split over the workers.

        The chunk number (global across steps) seeds sampling and names the groups, so a resumed run
        regenerates exactly what an uninterrupted one would."""
        cfg = self.cfg
        cid = self.chunk_seq
        self.chunk_seq += 1
        start = self.cursor.state()
        idx = self.cursor.take(cfg.rollout.gen_batch_size)
        n = cfg.rollout.n
        groups = [(self.train_tasks[i], n, f"c{cid}g{j}-{self.train_tasks[i].id}") for j, i in enumerate(idx)]
        seed = (cfg.run.seed * 1_000_003 + cid) & 0x7FFFFFFF
        w = len(self.workers)
        return [
            _SubBatch(cid, groups[k::w], seed * 16 + k, cursor_start=start) for k in range(w) if groups[k::w]
        ]

    def _submit(self, sb: _SubBatch) -> None:
        """Start `sb` on the next worker, round-robin."""
        sb.worker = worker = self._next_worker % len(self.workers)
        self._next_worker += 1
        sb.attempts += 1
        sb.stream_done, sb.scoring, sb.results = False, {}, []
        sb.ref = self.workers[worker].rollout.remote(sb.groups, self.version, sb.seed)

    def _score(self, sb: _SubBatch, group_ref: Any, tries: int = 1, unavailable_since: float = 0.0) -> None:
        """Send one streamed group to its RewardService. Every ref involved is the driver's (the group is
        a return of the rollout it submitted, the scored trajectories returns of this call), so a service
        that dies costs only this call, sent again with the same group."""
        i = sb.chunk % len(self.rewards)
        n = int(sb.groups[0][1])
        # A list wrapping the ref keeps Ray from resolving it in the caller: the service fetches it itself.
        report, *trajs = self.rewards[i].score_group.options(num_returns=1 + n).remote([group_ref], n)
        sb.scoring[report] = _Scoring(group_ref, trajs, i, tries, unavailable_since)

    def _take_report(self, sb: _SubBatch, obj: Any) -> dict | None:
        """The RewardService's report `obj` on a group of `sb` (its result kept unless the report says the
        rollout failed), or None when the group was sent to be scored again."""
        import ray

        sc = sb.scoring.pop(obj)
        try:
            res = ray.get(obj)
        except ray.exceptions.ActorUnavailableError as e:
            # Restarting, or its node is lost and not yet declared dead: ask again, bounded in time, not
            # counted as a try (a node loss answers this for seconds).
            since = sc.unavailable_since or time.monotonic()
            if time.monotonic() - since > 600:
                raise RuntimeError(f"RewardService {sc.service} unavailable for 600 s: {e}") from None
            time.sleep(0.2)
            self._score(sb, sc.group_ref, sc.tries, since)
            return None
        except ray.exceptions.RayActorError as e:  # the reward service died: score it again
            self.events["reward_restarts"] += 1
            self._reward_pids[sc.service] = None
            log.warning("RewardService died while scoring chunk %d (%s); scoring again", sb.chunk, e)
            if sc.tries > self.cfg.trainer.max_actor_restarts + 1:
                raise RuntimeError(
                    f"scoring a group of chunk {sb.chunk} failed {sc.tries} times: {e}"
                ) from None
            self._score(sb, sc.group_ref, sc.tries + 1)
            return None
        self._reward_pid(sc.service, res.get("pid"))
        if not res.get("failed"):
            sb.results.append((res, sc.group_ref, sc.traj_refs))
        return res

    def _reward_pid(self, i: int, pid: Any) -> None:
        """Count a RewardService restart seen through the pid in its reports (a kill between calls fails
        no call)."""
        old = self._reward_pids.get(i)
        if old is not None and pid != old:
            self.events["reward_restarts"] += 1
            log.warning("RewardService %d was restarted (pid %s -> %s)", i, old, pid)
        self._reward_pids[i] = pid

    def _collect_step(self) -> _StepState:
        """Roll out and score chunks until `train_batch_size x n` trajectories survive (or the chunk cap hits).

        Sub-batches still in flight at the end are carried into the next step when
        `trainer.max_staleness >= 1` (they were sampled with the current weights and are trained one
        version later), and otherwise cancelled with their prompts given back to the cursor."""
        import ray

        cfg = self.cfg
        need = cfg.trainer.train_batch_size * cfg.rollout.n
        cap = cfg.trainer.max_chunks_per_step
        st = _StepState()
        pending: deque[_SubBatch] = deque(sb for sb in self._carry if sb.ref is None)
        inflight = [sb for sb in self._carry if sb.ref is not None]
        self._carry = []
        consumed: set[int] = set()  # chunks with at least one scored sub-batch
        # Scored in full, not yet folded into the step (carried ones may have finished during training).
        complete = [sb for sb in inflight if sb.stream_done and len(sb.results) == len(sb.groups)]

        def fold() -> None:
            """Fold complete sub-batches into the step in chunk order, whatever order they finished in (a
            worker runs several at once): the step's data, and a resumed run's, do not depend on timing."""
            while complete:
                sb = min(inflight + list(pending), key=lambda s: (s.chunk, s.seed))
                if sb not in complete:
                    return
                complete.remove(sb)
                inflight.remove(sb)
                consumed.add(sb.chunk)
                st.add(sb)

        def start(sb: _SubBatch) -> None:
            pending.remove(sb)
            self._submit(sb)
            inflight.append(sb)

        new_chunks = 0
        max_inflight = len(self.workers) + 1
        t0 = time.perf_counter()
        while True:
            fold()
            enough = len(st.accepted) >= need
            # A new chunk only once every earlier one is folded: how many chunks a step uses (and so the
            # cursor, the carry and a resumed run) then depends on the results, never on timing.
            if not enough and (cap <= 0 or new_chunks < cap) and not pending and not inflight:
                pending.extend(self._new_chunk())
                new_chunks += 1
            while pending and len(inflight) - len(complete) < max_inflight and not enough:
                start(pending[0])
            # Once the step is full, only finish chunks that are partly used already (a group never splits).
            waiting = [sb for sb in inflight if not enough or sb.chunk in consumed or sb.carried]
            waiting += [sb for sb in pending if enough and (sb.chunk in consumed or sb.carried)]
            if not waiting:
                break
            for sb in [sb for sb in waiting if sb.ref is None]:  # re-queued parts of a consumed chunk
                start(sb)
            # Wait for the next streamed group of any sub-batch, or the next score report.
            objs = [sb.ref for sb in waiting if sb.ref is not None and not sb.stream_done]
            objs += [r for sb in waiting for r in sb.scoring]
            if not objs:
                raise RuntimeError(
                    f"rollout collection stalled (a bug): {len(complete)} sub-batches wait to fold"
                )
            (obj,), _ = ray.wait(objs, num_returns=1)
            if isinstance(obj, ray.ObjectRefGenerator):
                sb = next(s for s in inflight if s.ref is obj)
                try:
                    self._score(sb, next(obj))
                except StopIteration:
                    sb.stream_done = True
            else:
                sb = next(s for s in inflight if obj in s.scoring)
                res = self._take_report(sb, obj)
                if res is None:  # sent to be scored again
                    continue
                if res.get("failed"):
                    self._requeue(sb, str(res.get("error", "actor died")), inflight, pending)
                    continue
            if not sb.stream_done or sb.scoring:
                continue
            if len(sb.results) != len(sb.groups):  # the stream ended early: its worker failed
                self._requeue(
                    sb, f"{len(sb.results)} of {len(sb.groups)} groups came back", inflight, pending
                )
                continue
            complete.append(sb)
        leftover = inflight + list(pending)
        if leftover and cfg.trainer.max_staleness >= 1:
            self._carry = leftover
            for sb in leftover:
                sb.carried = True
        elif leftover:
            self._discard(leftover)
        st.chunks = len(consumed)
        st.t_rollout_wait = time.perf_counter() - t0
        return st

    def _requeue(self, sb: _SubBatch, error: str, inflight: list, pending: deque) -> None:
        """A rollout failed (its worker died or raised): recover the worker and roll the sub-batch again
        with the same seed."""
        self.events["requeued_subbatches"] += 1
        self._recover_worker(sb.worker)
        log.warning(
            "rollout of %d groups (chunk %d) failed on worker %d: %s; re-queued (attempt %d)",
            len(sb.groups),
            sb.chunk,
            sb.worker,
            error[:300],
            sb.attempts + 1,
        )
        if sb.attempts > self.cfg.trainer.max_actor_restarts + 1:
            raise RuntimeError(f"chunk {sb.chunk} failed {sb.attempts} times; last error: {error}")
        sb.ref, sb.scoring, sb.results = None, {}, []
        inflight.remove(sb)
        pending.appendleft(sb)

    def _finish_streams(self) -> None:
        """Weights change only between rollouts: before a sync, let the rollouts still streaming (a
        prefetched chunk) finish, so no trajectory mixes two weight versions."""
        import ray

        done = [sb.ref.completed() for sb in self._carry if sb.ref is not None and not sb.stream_done]
        if done:
            ray.wait(done, num_returns=len(done))

    def _prefetch(self) -> None:
        """With max_staleness >= 1, keep the workers busy with the next step's first chunk while the
        learner trains (those trajectories are one version stale when trained)."""
        if self.cfg.trainer.max_staleness < 1 or any(sb.ref is not None for sb in self._carry):
            return
        if not self._carry:
            self._carry = self._new_chunk()
            for sb in self._carry:
                sb.carried = True
        for sb in self._carry:
            if sb.ref is None:
                self._submit(sb)

    def resume_point(self) -> tuple[dict[str, int], int]:
        """(cursor, chunk_seq) of the first prompt not yet used by a trained step."""
        if self._carry:
            first = min(self._carry, key=lambda sb: sb.chunk)
            return first.cursor_start, first.chunk
        return self.cursor.state(), self.chunk_seq

    def _recover_worker(self, i: int) -> None:
        """After a failed rollout: wait for Ray to restart the worker, then give it the current weights."""
        import ray

        deadline = time.monotonic() + 600
        while True:
            try:
                info = ray.get(self.workers[i].ping.remote(), timeout=600)
                break
            except ray.exceptions.ActorUnavailableError:  # restarting: ask again
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
            except ray.exceptions.RayActorError as e:
                raise RuntimeError(
                    f"RolloutWorker {i} is dead and out of restarts (trainer.max_actor_restarts="
                    f"{self.cfg.trainer.max_actor_restarts}): {e}"
                ) from None
        if info.get("pid") != self._worker_pids.get(i):
            self.events["worker_restarts"] += 1
            self._worker_pids[i] = info.get("pid")
            log.warning("RolloutWorker %d was restarted (pid %s)", i, info.get("pid"))
        if int(info.get("version", -1)) != self.version:
            # colocated: rank j feeds worker j, so every worker gets the (unchanged) weights again
            self.learners.sync_weights(self.workers if self.colocated else [self.workers[i]], self.version)
            ray.get(self.workers[i].set_version.remote(self.version))

    def _discard(self, leftover: list[_SubBatch]) -> None:
        """Cancel unneeded sub-batches and give their prompts back (all of them belong to unused chunks)."""
        import ray

        for sb in leftover:
            if sb.ref is not None:
                # not recursive: the kernels its trajectories opened must still be closed by their tasks
                ray.cancel(sb.ref, force=False, recursive=False)
        first = min(leftover, key=lambda sb: sb.chunk)
        self.cursor.load_state(first.cursor_start)
        self.chunk_seq = first.chunk

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        from tqdm import tqdm

        cfg = self.cfg
        total = cfg.trainer.total_steps
        bar = tqdm(
            total=total, initial=self.step, desc="rl", disable=not cfg.logging.progress, dynamic_ncols=True
        )
        last: dict[str, Any] = {}
        try:
            if self.step == 0 and cfg.trainer.eval_every and self.eval_tasks:  # the baseline, for the curves
                self.logger.log(0, self.evaluate_with_workers())
            while self.step < total:
                last = self.train_one_step()
                bar.update(1)
                bar.set_postfix(
                    acc=f"{last.get('rollout/acc_mean', float('nan')):.2f}",
                    tools=f"{last.get('rollout/tool_calls_mean', float('nan')):.2f}",
                )
                if self.step % cfg.trainer.save_every == 0 or self.step == total:
                    self.save_checkpoint()
        finally:
            bar.close()
            self.logger.close()
        return last

    def train_one_step(self) -> dict[str, Any]:
        import ray

        cfg = self.cfg
        t_step = time.perf_counter()
        st = self._collect_step()
        need = cfg.trainer.train_batch_size * cfg.rollout.n
        underfull = len(st.accepted) < need
        if underfull:
            msg = (
                f"step {self.step + 1}: only {len(st.accepted)} of {need} trajectories (trainer.train_batch_size "
                f"x rollout.n) survived the filters in {st.chunks} chunks (trainer.max_chunks_per_step="
                f"{cfg.trainer.max_chunks_per_step}); drops: {st.drops}."
            )
            if cfg.trainer.on_underfull == "stop" or not st.accepted:
                raise RuntimeError(
                    msg + " Raise trainer.max_chunks_per_step (0: no cap), relax reward.filters, or set "
                    "trainer.on_underfull=train."
                )
            log.warning(msg + " Training on what there is.")
        # The same selection the RewardService ran per batch, now over the step's pool, with the step's size.
        from pyvision_rl.rewards.filters import select_for_training

        refs = {i: ref for i, _, ref in st.accepted}
        ranked = [i for i, _ in select_for_training(st.summaries, need, cfg.reward.filters)]
        if any(i not in refs for i in ranked):
            raise RuntimeError("the driver's selection kept a trajectory the RewardService dropped (a bug)")
        trained = [st.summaries[i] for i in ranked]
        self._prefetch()
        if self.colocated:  # the learner step gets the GPUs: engines free their KV cache and weights
            self._finish_streams()
            ray.get([w.sleep.remote() for w in self.workers])
        t0 = time.perf_counter()
        train_metrics = self._train_redoable([refs[i] for i in ranked])
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.version += 1
        self._finish_streams()
        if self.colocated:  # wake first: the weights are loaded into the awake engine
            ray.get([w.wake.remote() for w in self.workers])
        try:
            self.learners.sync_weights(self.workers, self.version)
        except ray.exceptions.RayActorError as e:  # a worker (its node) was lost: it gets them once back
            log.warning("weight sync v%d missed a RolloutWorker (%s); recovering them", self.version, e)
            for i in range(len(self.workers)):
                self._recover_worker(i)
        t_sync = time.perf_counter() - t0
        self.step += 1
        t_total = time.perf_counter() - t_step
        m: dict[str, Any] = {"version": self.version}
        m.update(summarize_rollouts(st.summaries))
        m.update(summarize_rollouts(trained, prefix="train_batch/"))
        m.update({f"train/{k}": v for k, v in train_metrics.items()})
        m.update({f"filter/dropped_{k}": v for k, v in st.drops.items()})
        m.update({f"reward/{k}": v for k, v in st.judge.items()})
        m["filter/trajectories_accepted"] = len(st.accepted)
        m["filter/trajectories_trained"] = len(ranked)
        m["filter/groups_trained"] = len({s["group_id"] for s in trained})
        m["filter/underfull"] = int(underfull)
        m["chunks_used"] = st.chunks
        stale = [self.version - 1 - s["version"] for s in st.summaries]
        m["staleness_max"] = max(stale) if stale else 0
        m["time/rollout_and_reward"] = st.t_rollout_wait
        m["time/train"] = t_train
        m["time/sync"] = t_sync
        m["time/step"] = t_total
        m["throughput/trajectories_per_s"] = len(st.summaries) / max(st.t_rollout_wait, 1e-9)
        m["throughput/tokens_per_s"] = sum(s["model_tokens"] for s in st.summaries) / max(
            st.t_rollout_wait, 1e-9
        )
        m.update({f"events/{k}": v for k, v in self.events.items()})
        m["collapse_warning"] = int(
            self.monitor.update(m.get("rollout/tool_calls_mean", float("nan")), self.step)
        )
        if cfg.trainer.eval_every and self.step % cfg.trainer.eval_every == 0 and self.eval_tasks:
            t0 = time.perf_counter()
            m.update(self.evaluate_with_workers())
            m["time/eval"] = time.perf_counter() - t0
        every = cfg.logging.rollouts_every
        if every and (self.step % every == 0 or self.step == cfg.trainer.total_steps):
            self._viewer_page(f"step_{self.step}", st.rollouts, st.summaries, set(ranked))
        m["trained_tasks"] = sorted({s["task_id"] for s in trained})
        m["cursor"] = self.resume_point()[0]
        self.logger.log(self.step, m)
        return m

    def _train_redoable(self, refs: list) -> dict[str, float]:
        """The learner step; when a rank dies, rebuild the learner group from the checkpoint of the step
        before and redo the step on the same trajectories, at most `trainer.learner_retries` times."""
        import ray

        retries = self.cfg.trainer.learner_retries
        for attempt in range(retries + 1):
            try:
                return self.learners.train_step(refs)
            except ray.exceptions.RayActorError as e:
                if attempt == retries:
                    raise RuntimeError(
                        f"the learner failed {attempt + 1} times at step {self.step + 1} "
                        f"(trainer.learner_retries={retries}); last error: {e}"
                    ) from None
                log.warning(
                    "a learner rank died at step %d (%s); rebuilding the learner group", self.step + 1, e
                )
                self._rebuild_learners(e)

    def _rebuild_learners(self, error: Exception) -> None:
        """New learner ranks with the state of the last checkpoint, which must be this step's start."""
        import ray

        from pyvision_rl.actors.learner import LearnerGroup

        ck = latest_checkpoint(self.run_dir)
        if ck is None and self.resume_from is not None:
            ck = self.resume_from
        ck_step = json.loads((ck / "trainer_state.json").read_text())["step"] if ck else 0
        if ck_step != self.step:
            raise RuntimeError(
                f"a learner rank died at step {self.step + 1} ({error}) and the step cannot be redone: the last "
                f"checkpoint is of step {ck_step}, not {self.step}. Resume the run (run.resume=auto), or set "
                "trainer.save_every=1 so that every step can be redone in place."
            ) from None
        for a in self.learners.actors:  # the survivors may hang in a collective with the dead rank
            ray.kill(a, no_restart=True)
        self.events["learner_rebuilds"] += 1
        pg = getattr(self, "_pg", None)  # a colocated run's placement group: the new ranks reuse its bundles
        kw = {"placement_group": pg} if pg is not None else {}
        self.learners = LearnerGroup(str(ck / "model") if ck else self.model_path, self.cfg, **kw)
        if ck is not None:
            self.learners.load(str(ck))
        self.learners.version = self.version

    def evaluate_with_workers(self) -> dict[str, float]:
        """Held-out accuracy with the current weights (eval sampling settings), through the workers."""
        import ray

        cfg = self.cfg
        tasks = self.eval_tasks[: cfg.eval.max_tasks or None]
        groups = [(t, cfg.eval.k, f"eval{self.step}-{t.id}") for t in tasks]
        w = len(self.workers)
        refs = [
            self.workers[i].evaluate.remote(groups[i::w], self.version, cfg.run.seed)
            for i in range(w)
            if groups[i::w]
        ]
        summaries = ray.get(self.rewards[0].summarize.remote(refs))
        if cfg.logging.rollouts_every:  # summaries follow the refs' order
            self._viewer_page(f"eval_step_{self.step}", [(None, r) for r in refs], summaries, None)
        return summarize_rollouts(summaries, prefix="eval/")

    def _viewer_page(self, name: str, rollouts: list, summaries: list, trained: set[int] | None) -> None:
        """The rollout viewer page <run>/rollouts/<name>.html and its wandb Table, from the first
        `logging.rollouts_per_step` x `rollout.n` trajectories; `rollouts`: (first summary index, ref), the
        index None when the ref's summaries directly follow the previous ref's."""
        import ray

        from pyvision_rl import viewer

        cap = self.cfg.logging.rollouts_per_step * self.cfg.rollout.n
        try:
            trajs, idx, pos = [], [], 0
            for base, ref in rollouts:
                got = ray.get(ref)
                pos = pos if base is None else base
                trajs += got
                idx += range(pos, pos + len(got))
                pos += len(got)
                if len(trajs) >= cap:
                    break
            trajs, idx = trajs[:cap], idx[:cap]
            sel = None if trained is None else {j for j, i in enumerate(idx) if i in trained}
            items = viewer.items_from_summaries(
                trajs, [summaries[i] for i in idx], sel, self.cfg.reward.filters
            )
            decode = viewer.tokenizer_decoder(self.model_path)
            title = f"{self.cfg.run.name} · {name.replace('_', ' ')}"
            viewer.write_rollout_page(self.run_dir / "rollouts", name, items, decode, title)
            self.logger.log_rollouts(self.step, viewer.table_rows(items, decode), key=f"rollouts/{name[:4]}")
        except Exception as e:  # the viewer must never stop a run
            log.warning("rollout viewer page %s failed: %s", name, e)

    def save_checkpoint(self) -> Path:
        ck = self.run_dir / "checkpoints" / f"{CKPT_PREFIX}{self.step}"
        if ck.exists():
            shutil.rmtree(ck)
        ck.mkdir(parents=True)
        self.learners.save(str(ck))
        cursor, chunk_seq = self.resume_point()
        state = {
            "step": self.step,
            "version": self.version,
            "cursor": cursor,
            "chunk_seq": chunk_seq,
            "rng": _rng_state(),
            "events": self.events,
        }
        (ck / "trainer_state.json").write_text(json.dumps(state, default=_json_default))
        # What the policy was trained with (prompt, pixels, turns): `pyvision-rl eval` defaults to it.
        (ck / SETTINGS_FILE).write_text(json.dumps(training_settings(self.cfg), indent=1))
        shutil.copy(self.logger.path, ck / "metrics.jsonl")
        (ck / COMPLETE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        self._prune_checkpoints()
        log.info("saved checkpoint %s", ck)
        return ck

    def _prune_checkpoints(self) -> None:
        keep = self.cfg.trainer.keep_checkpoints
        ckpts = sorted(
            (p for p in (self.run_dir / "checkpoints").glob(f"{CKPT_PREFIX}*")),
            key=lambda p: int(p.name[len(CKPT_PREFIX) :]),
        )
        for p in ckpts[:-keep] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)

    def shutdown(self) -> None:
        """Stop every actor this trainer started (the learners leave their process group first)."""
        import ray

        try:
            self.learners.shutdown()
        except Exception as e:
            log.debug("learner shutdown: %s", e)
        for w in self.workers:
            try:
                ray.get(w.shutdown.remote(), timeout=30)
            except Exception as e:
                log.debug("worker shutdown: %s", e)
        for pool in self.pools:
            try:
                ray.get(pool.shutdown.remote(), timeout=30)
            except Exception as e:
                log.debug("sandbox pool shutdown: %s", e)
        for a in [*self.workers, *self.pools, *self.rewards]:
            ray.kill(a, no_restart=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def check_resources(cfg: Config) -> None:
    """Fail fast (instead of waiting forever for an actor that cannot be placed) when the cluster lacks
    the CPUs/GPUs the config asks for."""
    import ray

    need_cpu = (
        cfg.rollout.num_workers * cfg.rollout.worker_num_cpus
        + cfg.learner.world_size * cfg.ray.learner_num_cpus
        + cfg.reward.num_services * cfg.ray.reward_num_cpus
        + cfg.sandbox.num_pools * cfg.ray.sandbox_num_cpus
    )
    need_gpu = (
        cfg.rollout.num_workers * cfg.rollout.worker_num_gpus
        + cfg.learner.world_size * cfg.learner.num_gpus_per_rank
    )
    have = ray.cluster_resources()
    problems = []
    if need_cpu > have.get("CPU", 0) + 1e-9:
        problems.append(
            f"{need_cpu:g} CPUs (rollout.num_workers x rollout.worker_num_cpus + learner.world_size x "
            f"ray.learner_num_cpus + reward.num_services x ray.reward_num_cpus + sandbox.num_pools x "
            f"ray.sandbox_num_cpus) but the cluster has {have.get('CPU', 0):g}"
        )
    if need_gpu > have.get("GPU", 0) + 1e-9:
        problems.append(
            f"{need_gpu:g} GPUs (rollout.num_workers x rollout.worker_num_gpus + learner.world_size x "
            f"learner.num_gpus_per_rank) but the cluster has {have.get('GPU', 0):g}"
        )
    if problems:
        raise ConfigError("the actors need " + "; ".join(problems) + ". Lower those settings or add nodes.")


class RayGauges:
    """Every numeric metric of a step as a Ray gauge `pyvision_<key>` tagged with the run name; Ray's
    Prometheus endpoint exports it as `ray_pyvision_<key>` (dashboard: cluster/grafana/)."""

    def __init__(self, run: str):
        self.run, self.gauges = run, {}

    def __call__(self, rec: dict[str, Any]) -> None:
        import ray
        from ray.util.metrics import Gauge

        if not ray.is_initialized():
            return
        for k, v in rec.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or v != v:  # v != v: NaN
                continue
            name = "pyvision_" + "".join(c if c.isalnum() else "_" for c in k).lower()  # as Prometheus has it
            if name not in self.gauges:
                self.gauges[name] = Gauge(name, description=f"pyvision-rl {k}", tag_keys=("run",))
            self.gauges[name].set(float(v), tags={"run": self.run})


def init_ray(cfg: Config) -> None:
    """Join `ray.address` (or $RAY_ADDRESS, as under `ray job submit`) or start a local cluster."""
    import ray

    if ray.is_initialized():
        return
    kw: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address:  # a job's runtime env comes from the submission (cluster/submit.sh)
        kw["address"] = address
    else:
        from pyvision_rl import QUIET_ENV

        kw["include_dashboard"] = cfg.ray.include_dashboard
        if cfg.ray.num_cpus:
            kw["num_cpus"] = cfg.ray.num_cpus
        env = {k: os.environ.get(k, v) for k, v in QUIET_ENV.items()}
        for k in ("TORCH_EXTENSIONS_DIR", "WANDB_MODE", "WANDB_API_KEY", "DOCKER_HOST"):
            if k in os.environ:
                env[k] = os.environ[k]
        kw["runtime_env"] = {"env_vars": env}
    ctx = ray.init(**kw)
    url = getattr(ctx, "dashboard_url", None)
    if url:
        log.info("Ray dashboard: http://%s", url)


def train(cfg: Config) -> dict[str, Any]:
    """Run RL training to `trainer.total_steps` (resuming per `run.resume`); returns the last metrics."""
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.shutdown()
