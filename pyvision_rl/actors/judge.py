"""JudgeActor: the in-cluster LLM judge (`reward.judge.backend=engine`), and the RewardService's handle on it.

The actor owns a generation engine on the judge checkpoint (`reward.judge.model`: HF on CPU, vLLM on GPU)
and answers `judge_many` with `rewards.judge.EngineJudge`; it is an async actor so the engine's per-request
coroutines batch together. `RemoteJudge` is what the RewardService calls: one `judge_many` per scored batch,
bounded by a timeout, and a dead or hung actor costs that batch's judged scores (all None), not the run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import ray

from pyvision_rl.config import JudgeConfig
from pyvision_rl.rewards.judge import EngineJudge, JudgeItem

log = logging.getLogger("pyvision_rl.judge")


@ray.remote
class JudgeActor:
    """A generation engine serving judge prompts (see the module docstring)."""

    def __init__(self, judge_cfg: dict | JudgeConfig) -> None:
        cfg = judge_cfg if isinstance(judge_cfg, JudgeConfig) else JudgeConfig.model_validate(judge_cfg)
        if not cfg.model:
            raise ValueError("reward.judge.backend=engine needs reward.judge.model (a checkpoint directory)")
        if cfg.engine == "vllm":
            from transformers import AutoTokenizer

            from pyvision_rl.engines.vllm import VLLMEngine

            engine = VLLMEngine(cfg.model)
            tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        else:
            from pyvision_rl.engines.hf import HFEngine

            engine = HFEngine(cfg.model, device="cuda" if cfg.num_gpus > 0 else "cpu")
            tokenizer = engine.tokenizer
        self.judge = EngineJudge(engine, tokenizer, cfg)

    def ping(self) -> bool:
        return True

    async def judge_many(self, items: list[JudgeItem]) -> list[float | None]:
        return await self.judge.ajudge_many(items)


class RemoteJudge:
    """`judge_many` through a JudgeActor handle, with a timeout over the whole batch."""

    def __init__(self, actor: Any, timeout_s: float) -> None:
        self.actor, self.timeout_s = actor, timeout_s

    def judge_many(self, items: Sequence[JudgeItem]) -> list[float | None]:
        if not items:
            return []
        try:
            return ray.get(self.actor.judge_many.remote(list(items)), timeout=self.timeout_s)
        except Exception as e:  # noqa: BLE001 - GetTimeoutError, RayActorError...: these answers go unjudged
            log.warning("judge actor failed on %d answers: %s: %s", len(items), type(e).__name__, e)
            return [None] * len(items)
