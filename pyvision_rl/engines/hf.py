"""HFEngine: the GenerationEngine on transformers `generate` (the CPU default; also works on one GPU).

Batched with left padding (Qwen-VL's multimodal positions are correct under left padding), images encoded
by the one shared helper (`models.processing.build_forward_inputs`, which also supplies
`mm_token_type_ids`), every special token except the turn terminators suppressed while sampling (the same
mask the learner applies), stop strings kept in the output, and per-token log-probs of the sampled tokens
under the temperature-scaled, suppressed distribution — the quantity the learner recomputes.
"""

from __future__ import annotations

import logging
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


class _TurnStop:
    """Per-row stopping: a terminator token, a stop string (checked on the decoded tail of the new
    tokens only) or the row's own token cap. Records where and why each row finished."""

    def __init__(self, tokenizer: Any, prompt_len: int, caps: list[int], stops: list[str], eos_ids: set[int]):
        self.tok = tokenizer
        self.prompt_len = prompt_len
        self.caps = caps
        self.stops = [s for s in stops if s]
        # Enough tokens to cover any stop string (each token is at least one character).
        self.window = max((len(s) for s in self.stops), default=1) + 1
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
            elif self.stops:
                tail = self.tok.decode(input_ids[b, max(self.prompt_len, input_ids.shape[1] - self.window) :])
                if any(s in tail for s in self.stops):
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
    passed instead (tests, or sharing a model already in memory).
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
        sp = special_ids(self.tokenizer)
        self.eos_ids = {sp["im_end"], sp["endoftext"]}
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else sp["endoftext"]
        )
        vocab = int(model.get_output_embeddings().weight.shape[0])
        self.suppress_ids = torch.tensor(suppressed_token_ids(self.tokenizer, vocab), dtype=torch.long)

    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest], sampling: SamplingParams) -> list[GenerationOutput]:
        """Sample one turn for all requests in one batched `generate` call."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from pyvision_rl.models.processing import build_forward_inputs

        if not requests:
            return []
        caps = [
            max(
                0,
                sampling.max_new_tokens
                if r.max_new_tokens is None
                else min(r.max_new_tokens, sampling.max_new_tokens),
            )
            for r in requests
        ]
        outs: list[GenerationOutput | None] = [None] * len(requests)
        live = [i for i, c in enumerate(caps) if c > 0]
        for i in range(len(requests)):
            if caps[i] == 0:
                outs[i] = GenerationOutput([], [], "length", "")
        if not live:
            return outs  # type: ignore[return-value]
        inputs = build_forward_inputs(
            self.processor,
            [requests[i].prompt_ids for i in live],
            [list(requests[i].images) for i in live],
            pad_side="left",
            pad_id=self.pad_id,
            device=self.device,
        )
        prompt_len = inputs["input_ids"].shape[1]
        stopper = _TurnStop(self.tokenizer, prompt_len, [caps[i] for i in live], sampling.stop, self.eos_ids)
        greedy = sampling.temperature <= 0
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        gen_kwargs: dict[str, Any] = dict(
            max_new_tokens=max(caps[i] for i in live),
            do_sample=not greedy,
            logits_processor=LogitsProcessorList([_Suppress(self.suppress_ids)]),
            stopping_criteria=StoppingCriteriaList([stopper]),
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
            output_logits=sampling.logprobs,
        )
        if not greedy:
            # top_k=0 / top_p=1.0: true sampling (transformers' default top_k=50 is not)
            gen_kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        else:
            gen_kwargs.update(temperature=None, top_k=None, top_p=None)
        res = self.model.generate(**inputs, **gen_kwargs)
        seqs = res.sequences[:, prompt_len:].cpu()
        temp = sampling.temperature if sampling.temperature > 0 else 1.0
        lps_all = self._logprobs(res.logits, seqs, temp) if sampling.logprobs else None
        for row, i in enumerate(live):
            n = stopper.finished_at[row]
            if n is None:
                n = min(caps[i], seqs.shape[1])
            ids = [int(t) for t in seqs[row, :n]]
            lps = [float(x) for x in lps_all[row, :n]] if lps_all is not None else [0.0] * n
            outs[i] = GenerationOutput(
                token_ids=ids,
                logprobs=lps,
                finish_reason=stopper.reason[row],  # type: ignore[arg-type]
                text=self.tokenizer.decode(ids, skip_special_tokens=False),
            )
        return outs  # type: ignore[return-value]

    def _logprobs(
        self, logits: tuple[torch.Tensor, ...], seqs: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """log p(sampled token) per step from the raw logits, with the sampler's mask and temperature."""
        out = torch.zeros(seqs.shape, dtype=torch.float32)
        idx = self.suppress_ids
        for step, lg in enumerate(logits):  # one (B, V) tensor per step: never materialise (T, B, V)
            lg = lg.float().cpu()
            if temperature != 1.0:
                lg = lg / temperature
            lg = lg.index_fill(-1, idx[idx < lg.shape[-1]], float("-inf"))
            tok = seqs[:, step].unsqueeze(-1)
            out[:, step] = lg.gather(-1, tok).squeeze(-1) - torch.logsumexp(lg, dim=-1)
        return out

    @torch.no_grad()
    def update_weights(self, weights: NamedTensors, version: int) -> None:
        """Copy new weights into the model in place (names as in `model.state_dict()`); unknown names raise."""
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

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The served weights (tests compare them with the learner's)."""
        return self.model.state_dict()
