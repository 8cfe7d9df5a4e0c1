"""HFEngine: the GenerationEngine on transformers `generate` (the CPU default; also works on one GPU).

A request-level continuous batcher: every `await generate(request)` joins a queue; one scheduler task
takes whatever is pending (up to `max_batch`) as one batched `model.generate` in a worker thread (the
event loop stays free), and the requests that arrive meanwhile form the next batch the moment it returns.
transformers' own continuous batching (`generate_batch` / `ContinuousBatchingManager`, 5.x) takes token
ids only - no pixel values, no `mm_token_type_ids` (Qwen-VL's 3-D rope positions), no per-request stop
strings or logits processors - so it cannot serve Qwen-VL turns; a new request therefore waits for the
running batch to finish, never for a whole wave.

Batched with left padding (Qwen-VL's multimodal positions are correct under left padding), images encoded
by the one shared helper (`models.processing.build_forward_inputs`, which also supplies
`mm_token_type_ids`), every special token except the turn terminators suppressed while sampling (the same
mask the learner applies), stop strings kept in the output, and per-token log-probs of the sampled tokens
under the temperature-scaled, suppressed distribution - the quantity the learner recomputes. Each row
samples with its own `torch.Generator` seeded by its request's `seed`, so a seeded request's tokens do not
depend on the batch it lands in.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from pyvision_rl.engines.base import (
    GenerationEngine,
    GenerationOutput,
    GenerationRequest,
    NamedTensors,
    SamplingParams,
    named_tensors,
)

log = logging.getLogger(__name__)


class _Suppress:
    """Logits processor: -inf on ids the policy must never sample."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill(-1, self.ids.to(scores.device), float("-inf"))


class _RowSampler:
    """Logits processor that samples each row itself (temperature, top-k, top-p of that row's request, a
    uniform draw from its own generator, inverse-CDF over the batch at once) and leaves only the chosen
    token finite, so greedy decoding then emits it. Greedy rows (temperature <= 0) are left to the argmax."""

    def __init__(self, samplings: list[SamplingParams], device: torch.device):
        self.rows = [b for b, s in enumerate(samplings) if s.temperature > 0]
        self.samplings = samplings
        self.temps = torch.tensor([samplings[b].temperature for b in self.rows], device=device).unsqueeze(-1)
        self.gens: list[torch.Generator | None] = []
        for b in self.rows:
            seed, g = samplings[b].seed, None
            if seed is not None:
                g = torch.Generator(device=device)
                g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF)
            self.gens.append(g)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return scores
        lg = scores[self.rows].float() / self.temps
        for r, b in enumerate(self.rows):
            s = self.samplings[b]
            if s.top_k and s.top_k > 0:
                kth = torch.topk(lg[r], min(s.top_k, lg.shape[-1])).values[-1]
                lg[r] = lg[r].masked_fill(lg[r] < kth, float("-inf"))
            if s.top_p < 1.0:
                srt, idx = torch.sort(lg[r], descending=True)
                p = torch.softmax(srt, -1)
                drop = p.cumsum(-1) - p >= s.top_p  # keep the smallest prefix reaching top_p
                lg[r] = lg[r].index_fill(-1, idx[drop], float("-inf"))
        cdf = torch.softmax(lg, -1).cumsum(-1)
        u = torch.stack([torch.rand((), generator=g, device=cdf.device) for g in self.gens])
        u = u.unsqueeze(-1) * cdf[:, -1:]  # the cdf's own total, so rounding never runs past the end
        tok = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)  # p(tok) > 0
        out = scores.clone()
        rows = torch.tensor(self.rows, device=scores.device)
        out[rows] = float("-inf")
        out[rows.unsqueeze(-1), tok] = 0.0
        return out


class _TurnStop:
    """Per-row stopping: a terminator token, one of the row's stop strings (checked on the decoded tail of
    the new tokens only) or the row's own token cap. Records where and why each row finished."""

    def __init__(
        self, tokenizer: Any, prompt_len: int, caps: list[int], stops: list[list[str]], eos_ids: set[int]
    ):
        self.tok = tokenizer
        self.prompt_len = prompt_len
        self.caps = caps
        self.stops = [[s for s in row if s] for row in stops]
        # Enough tokens to cover any stop string (each token is at least one character).
        self.windows = [max((len(s) for s in row), default=1) + 1 for row in self.stops]
        self.eos_ids = eos_ids
        self.finished_at: list[int | None] = [None] * len(caps)
        self.reason: list[str] = ["length"] * len(caps)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
        n_new = input_ids.shape[1] - self.prompt_len
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for b in range(input_ids.shape[0]):
            if self.finished_at[b] is not None:
                done[b] = True
                continue
            last = int(input_ids[b, -1])
            reason = None
            if last in self.eos_ids:
                reason = "eos"
            elif self.stops[b]:
                lo = max(self.prompt_len, input_ids.shape[1] - self.windows[b])
                tail = self.tok.decode(input_ids[b, lo:])
                if any(s in tail for s in self.stops[b]):
                    reason = "stop"
            if reason is None and n_new >= self.caps[b]:
                reason = "length"
            if reason is not None:
                self.finished_at[b] = n_new
                self.reason[b] = reason
                done[b] = True
        return done


class HFEngine(GenerationEngine):
    """transformers generation over a Qwen-VL checkpoint dir.

    `model_path`: a checkpoint directory loadable by `models.load_policy`. `model`/`processor` may be
    passed instead (tests, or sharing a model already in memory). `max_batch`: the most requests one
    batched forward takes. `busy_s`, `batches` and `batched_requests` count the engine's work (benchmarks
    read them).
    """

    def __init__(
        self,
        model_path: str | None = None,
        device: str = "cpu",
        dtype: Any = None,
        model: Any = None,
        processor: Any = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_batch: int = 64,
    ):
        from pyvision_rl.models.processing import special_ids, suppressed_token_ids

        if model is None or processor is None:
            if not model_path:
                raise ValueError(
                    "HFEngine needs model_path (a Qwen-VL checkpoint dir) or model and processor"
                )
            from pyvision_rl.models.loading import load_policy

            model, processor = load_policy(
                model_path, dtype=dtype, device=device, min_pixels=min_pixels, max_pixels=max_pixels
            )
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = torch.device(device)
        self.version = 0
        self.max_batch = max(1, int(max_batch))
        sp = special_ids(self.tokenizer)
        self.eos_ids = {sp["im_end"], sp["endoftext"]}
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else sp["endoftext"]
        )
        vocab = int(model.get_output_embeddings().weight.shape[0])
        self.suppress_ids = torch.tensor(suppressed_token_ids(self.tokenizer, vocab), dtype=torch.long)
        # One thread runs the model: torch work never blocks the event loop, and weight updates (from any
        # thread) take the same lock, so a batch never sees half-updated weights.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-engine")
        self._model_lock = threading.Lock()
        self._pending: list[tuple[GenerationRequest, SamplingParams, asyncio.Future]] = []
        self._scheduler: asyncio.Task | None = None
        self.busy_s = 0.0
        self.batches = 0
        self.batched_requests = 0

    async def generate(self, request: GenerationRequest, sampling: SamplingParams) -> GenerationOutput:
        """Sample one turn; batched with every other request pending on this engine."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._pending.append((request, sampling, fut))
        sched = self._scheduler
        if sched is None or sched.done() or sched.get_loop() is not loop:
            # (a scheduler of a finished event loop, e.g. an earlier `asyncio.run`, is replaced)
            self._pending = [p for p in self._pending if p[2].get_loop() is loop]
            self._scheduler = loop.create_task(self._schedule())
        return await fut

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0)  # let every coroutine that is ready queue its request first
            self._pending = [p for p in self._pending if not p[2].done()]  # cancelled waiters
            if not self._pending:
                return
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            try:
                outs = await loop.run_in_executor(
                    self._executor, self._generate_batch, [b[0] for b in batch], [b[1] for b in batch]
                )
            except Exception as e:  # noqa: BLE001 - the batch's callers get the error
                for *_, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (*_, f), o in zip(batch, outs, strict=True):
                if not f.done():
                    f.set_result(o)

    @torch.no_grad()
    def _generate_batch(
        self, requests: list[GenerationRequest], samplings: list[SamplingParams]
    ) -> list[GenerationOutput]:
        """One batched `generate` over requests with their own sampling params (runs in the engine thread)."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from pyvision_rl.models.processing import build_forward_inputs

        caps = [
            max(0, s.max_new_tokens if r.max_new_tokens is None else min(r.max_new_tokens, s.max_new_tokens))
            for r, s in zip(requests, samplings, strict=True)
        ]
        outs: list[GenerationOutput | None] = [
            GenerationOutput([], [], "length", "") if c == 0 else None for c in caps
        ]
        live = [i for i, c in enumerate(caps) if c > 0]
        if not live:
            return outs  # type: ignore[return-value]
        t0 = time.perf_counter()
        with self._model_lock:
            inputs = build_forward_inputs(
                self.processor,
                [requests[i].prompt_ids for i in live],
                [list(requests[i].images) for i in live],
                pad_side="left",
                pad_id=self.pad_id,
                device=self.device,
            )
            prompt_len = inputs["input_ids"].shape[1]
            rows = [samplings[i] for i in live]
            stopper = _TurnStop(
                self.tokenizer, prompt_len, [caps[i] for i in live], [s.stop for s in rows], self.eos_ids
            )
            want_lps = any(s.logprobs for s in rows)
            res = self.model.generate(
                **inputs,
                max_new_tokens=max(caps[i] for i in live),
                do_sample=False,  # the row sampler picks each token; greedy decoding emits it
                temperature=None,
                top_k=None,
                top_p=None,
                logits_processor=LogitsProcessorList(
                    [_Suppress(self.suppress_ids), _RowSampler(rows, self.device)]
                ),
                stopping_criteria=StoppingCriteriaList([stopper]),
                eos_token_id=sorted(self.eos_ids),
                pad_token_id=self.pad_id,
                return_dict_in_generate=True,
                output_logits=want_lps,
            )
        seqs = res.sequences[:, prompt_len:].cpu()
        temps = torch.tensor([s.temperature if s.temperature > 0 else 1.0 for s in rows]).unsqueeze(-1)
        lps_all = self._logprobs(res.logits, seqs, temps) if want_lps else None
        for row, i in enumerate(live):
            n = stopper.finished_at[row]
            if n is None:
                n = min(caps[i], seqs.shape[1])
            ids = [int(t) for t in seqs[row, :n]]
            keep = lps_all is not None and rows[row].logprobs
            lps = [float(x) for x in lps_all[row, :n]] if keep else [0.0] * n
            outs[i] = GenerationOutput(
                token_ids=ids,
                logprobs=lps,
                finish_reason=stopper.reason[row],  # type: ignore[arg-type]
                text=self.tokenizer.decode(ids, skip_special_tokens=False),
            )
        self.busy_s += time.perf_counter() - t0
        self.batches += 1
        self.batched_requests += len(live)
        return outs  # type: ignore[return-value]

    def _logprobs(
        self, logits: tuple[torch.Tensor, ...], seqs: torch.Tensor, temperatures: torch.Tensor
    ) -> torch.Tensor:
        """log p(sampled token) per step from the raw logits, with the sampler's mask and each row's
        temperature (`temperatures`: (B, 1))."""
        from pyvision_rl.models.processing import sampler_logprobs

        out = torch.zeros(seqs.shape, dtype=torch.float32)
        idx = self.suppress_ids
        for step, lg in enumerate(logits):  # one (B, V) tensor per step: never materialise (T, B, V)
            out[:, step] = sampler_logprobs(lg.cpu(), seqs[:, step], idx[idx < lg.shape[-1]], temperatures)
        return out

    @torch.no_grad()
    def update_weights(self, weights: NamedTensors, version: int) -> None:
        """Copy new weights into the model in place (names as in `model.state_dict()`); unknown names raise.
        Waits for a running batch to finish (the next batch starts with the new weights)."""
        with self._model_lock:
            state = self.model.state_dict()
            n = 0
            for name, value in named_tensors(weights):
                if name not in state:
                    raise KeyError(
                        f"update_weights: parameter {name!r} is not in the engine's model "
                        "(the learner and rollout checkpoints differ?)"
                    )
                t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
                state[name].copy_(t.to(dtype=state[name].dtype, device=state[name].device))
                n += 1
            self.version = int(version)
            log.debug("HFEngine: loaded %d tensors, version %d", n, version)

    def close(self) -> None:
        """Stop the engine thread."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The served weights (tests compare them with the learner's)."""
        return self.model.state_dict()
