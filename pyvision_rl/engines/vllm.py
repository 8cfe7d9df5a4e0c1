"""VLLMEngine: the GenerationEngine on vLLM (GPU). Importable without vllm: it is imported on first use.

- Token prompts with images: `{"prompt_token_ids": ids, "multi_modal_data": {"image": [PIL, ...]}}`. Our
  context ids carry every image expanded to n `<|image_pad|>`; vLLM's multimodal processor expands a
  placeholder itself, so each run is collapsed to ONE `<|image_pad|>` before the call (the same as the
  release and verl do). vLLM gets the policy's `min_pixels`/`max_pixels` so its grids equal ours.
- Sampling: stop strings kept (`include_stop_str_in_output`), `<|im_end|>`/eos as stop tokens, the
  suppressed special tokens excluded through `allowed_token_ids`, per-request seeds.
- Log-probs: `logprobs=0` (the sampled token) with `logprobs_mode="processed_logprobs"`, i.e. after the
  allowed-token mask and temperature — the quantity the learner recomputes (vLLM's default is raw logits).
- Prefix caching on (multi-turn contexts share long prefixes). Sleep mode (level 1) for colocation.
- Weight updates in place: `collective_rpc` runs `model.load_weights` inside every vLLM worker.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pyvision_rl.engines.base import (
    GenerationEngine,
    GenerationOutput,
    GenerationRequest,
    NamedTensors,
    SamplingParams,
    named_tensors,
    to_pil,
)

log = logging.getLogger(__name__)


def _load_weights_in_worker(worker: Any, weights: list[tuple[str, Any]]) -> int:
    """Runs inside each vLLM worker (collective_rpc): load (name, tensor) pairs into its model in place."""
    import torch

    model = worker.model_runner.model
    device = next(model.parameters()).device
    pairs = [(n, (t if isinstance(t, torch.Tensor) else torch.as_tensor(t)).to(device)) for n, t in weights]
    loaded = model.load_weights(weights=pairs)
    return len(loaded) if loaded is not None else len(pairs)


def collapse_image_pads(ids: list[int], image_pad_id: int) -> list[int]:
    """Each run of `<|image_pad|>` -> one `<|image_pad|>` (vLLM expands it from the image itself)."""
    out: list[int] = []
    for t in ids:
        if t == image_pad_id and out and out[-1] == image_pad_id:
            continue
        out.append(t)
    return out


class VLLMEngine(GenerationEngine):
    """vLLM offline engine over a Qwen-VL checkpoint dir (one per RolloutWorker; tensor parallel inside)."""

    def __init__(
        self,
        model_path: str,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool = False,
        max_model_len: int = 8192,
        max_images: int = 16,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        seed: int = 0,
        enforce_eager: bool = False,
        **llm_kwargs: Any,
    ):
        # In-process engine core for TP=1: weights can then be loaded with no extra copy through IPC.
        if tensor_parallel_size == 1:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise ImportError(
                "rollout.engine=vllm needs vLLM (pip install -e '.[vllm]' on a CUDA machine); "
                "on CPU use rollout.engine=hf"
            ) from e
        from pyvision_rl.models.loading import load_processor
        from pyvision_rl.models.processing import special_ids, suppressed_token_ids

        self.processor = load_processor(model_path, min_pixels=min_pixels, max_pixels=max_pixels)
        self.tokenizer = self.processor.tokenizer
        sp = special_ids(self.tokenizer)
        self.image_pad_id = sp["image_pad"]
        self.stop_token_ids = [sp["im_end"], sp["endoftext"]]
        mm_kwargs = {
            k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None
        }
        self.llm = LLM(
            model=model_path,
            dtype="auto" if dtype in (None, "auto") else dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enable_sleep_mode=enable_sleep_mode,
            enable_prefix_caching=True,
            max_model_len=max_model_len,
            limit_mm_per_prompt={"image": max_images, "video": 0},
            mm_processor_kwargs=mm_kwargs or None,
            logprobs_mode="processed_logprobs",
            seed=seed,
            enforce_eager=enforce_eager,
            **llm_kwargs,
        )
        vocab = int(self.llm.llm_engine.model_config.get_vocab_size())
        banned = set(suppressed_token_ids(self.tokenizer, vocab))
        self.allowed_token_ids = [i for i in range(vocab) if i not in banned]
        self.version = 0
        self._asleep = False

    def _params(self, sampling: SamplingParams, cap: int, seed: int | None):
        from vllm import SamplingParams as VSP

        return VSP(
            n=1,
            temperature=max(sampling.temperature, 0.0),
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,  # -1: off in every vLLM version
            max_tokens=cap,
            stop=list(sampling.stop),
            stop_token_ids=list(self.stop_token_ids),
            include_stop_str_in_output=True,
            skip_special_tokens=False,
            spaces_between_special_tokens=False,
            logprobs=0 if sampling.logprobs else None,
            allowed_token_ids=self.allowed_token_ids,
            seed=seed,
        )

    def generate(self, requests: list[GenerationRequest], sampling: SamplingParams) -> list[GenerationOutput]:
        """One `LLM.generate` call over all requests (token prompts + images)."""
        if self._asleep:
            self.wake()
        outs: list[GenerationOutput | None] = [None] * len(requests)
        prompts, params, index = [], [], []
        for i, r in enumerate(requests):
            cap = (
                sampling.max_new_tokens
                if r.max_new_tokens is None
                else min(r.max_new_tokens, sampling.max_new_tokens)
            )
            if cap <= 0:
                outs[i] = GenerationOutput([], [], "length", "")
                continue
            p: dict[str, Any] = {
                "prompt_token_ids": collapse_image_pads(list(r.prompt_ids), self.image_pad_id)
            }
            if r.images:
                p["multi_modal_data"] = {"image": [to_pil(im) for im in r.images]}
            prompts.append(p)
            params.append(self._params(sampling, cap, None if sampling.seed is None else sampling.seed + i))
            index.append(i)
        if prompts:
            results = self.llm.generate(prompts, params, use_tqdm=False)
            for i, res in zip(index, results, strict=True):
                o = res.outputs[0]
                ids = list(o.token_ids)
                if sampling.logprobs and o.logprobs is not None:
                    lps = [float(step[t].logprob) for t, step in zip(ids, o.logprobs, strict=True)]
                else:
                    lps = [0.0] * len(ids)
                if o.finish_reason == "length":
                    reason = "length"
                elif isinstance(o.stop_reason, str):
                    reason = "stop"
                else:
                    reason = "eos"
                outs[i] = GenerationOutput(ids, lps, reason, o.text)  # type: ignore[arg-type]
        return outs  # type: ignore[return-value]

    def update_weights(self, weights: NamedTensors, version: int) -> None:
        """Load (a subset of) the weights in place in every vLLM worker; prefix cache is reset (the
        cached KV was computed with the old weights)."""
        pairs = list(named_tensors(weights))
        self.llm.collective_rpc(_load_weights_in_worker, args=(pairs,))
        self.llm.reset_prefix_cache()
        self.version = int(version)

    def sleep(self) -> None:
        """Free KV cache and offload weights (sleep level 1); needs enable_sleep_mode=True."""
        if not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        del self.llm
