"""The LLM judge for judged data sources (the release judges most of its sources with Qwen2.5-72B-Instruct).

One prompt (few-shot, our own wording) asks whether a model's answer means the same as the reference and
ends with `Judgement:`; the reply is read as the release reads it (`parse_judgement`). Two backends with the
same `judge_many([(question, answer, ground_truth, data_source)]) -> [1.0 | 0.0 | None]`:
- `HTTPJudge`: an OpenAI-compatible chat-completions endpoint (a vLLM server the user runs), stdlib only;
- `EngineJudge`: a GenerationEngine (HF on CPU, vLLM on GPU), run in-cluster by `actors.judge.JudgeActor`.
Both batch, time out and retry; `None` means that answer could not be judged (it then scores 0 and is
counted, `rewards.verifiers.score_batch`), never an exception that stops the run.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pyvision_rl.config import JudgeConfig

log = logging.getLogger("pyvision_rl.judge")

JudgeItem = tuple[str, str, str, str]  # (question, model answer, reference answer, data_source)

SYSTEM_PROMPT = "You are a helpful assistant."
JUDGE_INSTRUCTIONS = (
    "You check answers against a reference. Each case gives a [Question], the [Reference] answer, which is "
    "always right, and the [Answer] a model gave. Reply Judgement: 1 when the answer says the same thing as "
    "the reference, even if worded differently, shorter, or in another equivalent notation (0.5 and 1/2; "
    "'B' and the text of option B). Reply Judgement: 0 when it differs in any detail that matters, or "
    "answers something else. Write only the judgement.\n"
)
JUDGE_EXAMPLES = (
    ("What colour is the umbrella on the left?", "The umbrella on the left is red.", "red", 1),
    ("How many birds sit on the wire?", "There are 4 birds.", "five", 0),
    ("Which option shows the largest share?\nA. 2019\nB. 2020\nC. 2021", "B", "B. 2020", 1),
    ("What fraction of the square is shaded?", "3/8", "0.375", 1),
    ("Is the cup to the left or the right of the laptop?", "Left.", "right", 0),
    ("What is the title of the chart?", "Annual rainfall by city", "Rainfall per year in each city", 1),
)


def judge_prompt(question: str, answer: str, ground_truth: str) -> str:
    """The judge's user message: instructions, worked cases, then this case ending with `Judgement:`."""
    cases = "".join(
        f"\n[Question]: {q}\n[Reference]: {g}\n[Answer]: {a}\nJudgement: {v}\n"
        for q, g, a, v in JUDGE_EXAMPLES
    )
    return (
        f"{JUDGE_INSTRUCTIONS}{cases}\n[Question]: {question}\n[Reference]: {ground_truth}\n"
        f"[Answer]: {answer}\nJudgement:"
    )


def judge_messages(question: str, answer: str, ground_truth: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": judge_prompt(question, answer, ground_truth)},
    ]


def parse_judgement(reply: str | None) -> float | None:
    """1.0 / 0.0 from a judge reply, read as the release does; None when it says neither.

    The text after the last `Judgement:` holds a 1 (right) or else a 0 (wrong); a reply without that label
    must be exactly `1` or `0`.
    """
    if reply is None:
        return None
    text = reply.strip()
    if "Judgement:" in text:
        text = text.split("Judgement:")[-1].strip()
        return 1.0 if "1" in text else 0.0 if "0" in text else None
    return {"1": 1.0, "0": 0.0}.get(text)


class HTTPJudge:
    """Judge through an OpenAI-compatible `POST {base_url}/chat/completions` (urllib, no client library).

    Requests run `cfg.concurrency` at a time; each has `cfg.timeout_s` and up to `cfg.retries` retries
    (backoff with jitter) on a network error, a non-200 status or an unreadable reply.
    """

    def __init__(self, cfg: JudgeConfig) -> None:
        if not cfg.base_url or not cfg.model:
            raise ValueError("reward.judge.backend=http needs reward.judge.base_url and reward.judge.model")
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.api_key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        if cfg.api_key_env and not self.api_key:
            log.warning(
                "reward.judge.api_key_env=%s is not set; calling the judge without a key", cfg.api_key_env
            )

    def _post(self, item: JudgeItem) -> float | None:
        q, a, g, _ = item
        body = {
            "model": self.cfg.model,
            "messages": judge_messages(q, a, g),
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(min(8.0, 0.25 * 2**attempt) * (0.5 + random.random()))
            req = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    reply = json.loads(resp.read())["choices"][0]["message"]["content"]
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
                last = f"{type(e).__name__}: {e}"
                continue
            score = parse_judgement(reply)
            if score is not None:
                return score
            last = f"unreadable reply {reply[:80]!r}"
        log.warning("judge request to %s failed after %d attempts: %s", self.url, self.cfg.retries + 1, last)
        return None

    def judge_many(self, items: Sequence[JudgeItem]) -> list[float | None]:
        if not items:
            return []
        with ThreadPoolExecutor(max(1, min(self.cfg.concurrency, len(items)))) as ex:
            return list(ex.map(self._post, items))


class EngineJudge:
    """Judge with a GenerationEngine and the judge model's tokenizer (the prompt is its chat template).

    Works with the async per-request `generate(request, sampling)` seam (all requests gathered, the engine
    batches them) and with an engine whose `generate(requests, sampling)` takes a list. Unreadable replies
    are asked again, up to `cfg.retries` times.
    """

    def __init__(self, engine: Any, tokenizer: Any, cfg: JudgeConfig) -> None:
        self.engine, self.tokenizer, self.cfg = engine, tokenizer, cfg

    def _request(self, item: JudgeItem) -> Any:
        from pyvision_rl.engines.base import GenerationRequest

        q, a, g, _ = item
        ids = self.tokenizer.apply_chat_template(judge_messages(q, a, g), add_generation_prompt=True)
        return GenerationRequest(prompt_ids=list(ids))

    async def _generate(self, requests: list[Any], seed: int) -> list[str]:
        from pyvision_rl.engines.base import SamplingParams

        def sampling(i: int) -> SamplingParams:
            return SamplingParams(
                temperature=self.cfg.temperature,
                max_new_tokens=self.cfg.max_tokens,
                stop=[],
                logprobs=False,
                seed=seed + i,
            )

        gen = self.engine.generate
        if inspect.iscoroutinefunction(gen):
            outs = await asyncio.gather(*(gen(r, sampling(i)) for i, r in enumerate(requests)))
        else:
            outs = await asyncio.to_thread(gen, requests, sampling(0))
        return [o.text or self.tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]

    async def ajudge_many(self, items: Sequence[JudgeItem]) -> list[float | None]:
        scores: list[float | None] = [None] * len(items)
        todo = list(range(len(items)))
        for attempt in range(self.cfg.retries + 1):
            if not todo:
                break
            try:
                texts = await asyncio.wait_for(
                    self._generate([self._request(items[i]) for i in todo], seed=1_000_003 * attempt),
                    self.cfg.timeout_s,
                )
            except Exception as e:  # noqa: BLE001 - a judge failure costs these answers, not the run
                log.warning("judge engine failed on %d answers (attempt %d): %s", len(todo), attempt + 1, e)
                continue
            for i, text in zip(todo, texts, strict=True):
                scores[i] = parse_judgement(text)
            todo = [i for i in todo if scores[i] is None]
        return scores

    def judge_many(self, items: Sequence[JudgeItem]) -> list[float | None]:
        """Synchronous form, for callers without a running event loop."""
        return asyncio.run(self.ajudge_many(items))
