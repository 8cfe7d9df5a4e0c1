"""ScriptedEngine: a GenerationEngine that replays fixed assistant turns.

A legitimate stand-in for the policy wherever the policy's quality is not what is being tested (agent
loop tests, benchmarks of the loop's own overhead) and the way to build expert (SFT) trajectories through
the real loop and sandbox: the scripted text is tokenized once, as if the model had sampled those ids.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from pyvision_rl.engines.base import (
    GenerationEngine,
    GenerationOutput,
    GenerationRequest,
    NamedTensors,
    SamplingParams,
)

Responder = Callable[[str, int], str]


class ScriptedEngine(GenerationEngine):
    """Replays turns: `responder(request_id, turn_index) -> text` (turn_index counts per request id).

    Stop semantics mimic a real engine: a turn is cut right after the first stop string (`</code>`,
    finish "stop"); a turn without one gets `<|im_end|>` appended (finish "eos"); `max_new_tokens` cuts
    it (finish "length"). Logprobs are `logprob` for every token. `delay_s` simulates generation time.
    """

    def __init__(self, tokenizer: Any, responder: Responder, logprob: float = 0.0, delay_s: float = 0.0):
        self.tokenizer = tokenizer
        self.responder = responder
        self.logprob = logprob
        self.delay_s = delay_s
        self.version = 0
        self.turns: dict[str, int] = defaultdict(int)
        self.calls: list[str] = []  # the request id of every generate call, in call order
        self._im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_turns(cls, tokenizer: Any, turns: dict[str, list[str]], **kw: Any) -> ScriptedEngine:
        """Replay `turns[key]` for every request whose id starts with `key` (the agent loop's request ids
        are `"{task_id}#{group_id}#{i}"`, so keying by task id works). Past the script: an empty turn."""

        def responder(request_id: str, turn: int) -> str:
            key = request_id.split("#", 1)[0]
            script = turns.get(key)
            if script is None:
                script = next((v for k, v in turns.items() if request_id.startswith(k)), [])
            return script[turn] if turn < len(script) else ""

        return cls(tokenizer, responder, **kw)

    def _encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            self._cache[text] = ids
        return ids

    async def generate(self, request: GenerationRequest, sampling: SamplingParams) -> GenerationOutput:
        """Return the request's next scripted turn (after `delay_s`, awaited: other requests go on)."""
        req = request
        self.calls.append(req.request_id)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        turn = self.turns[req.request_id]
        self.turns[req.request_id] += 1
        text = self.responder(req.request_id, turn)
        finish = "eos"
        cut = min((text.find(s) + len(s) for s in sampling.stop if s and s in text), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        ids = self._encode(text)
        if finish == "eos":
            ids = ids + [self._im_end]
        cap = (
            sampling.max_new_tokens
            if req.max_new_tokens is None
            else min(sampling.max_new_tokens, req.max_new_tokens)
        )
        if len(ids) > cap:
            ids, finish = ids[:cap], "length"
        return GenerationOutput(
            token_ids=ids,
            logprobs=[self.logprob] * len(ids),
            finish_reason=finish,
            text=self.tokenizer.decode(ids, skip_special_tokens=False),
        )

    def update_weights(self, weights: NamedTensors, version: int) -> None:
        """Nothing to load; records the version."""
        self.version = version
