"""The GenerationEngine contract (README, "Architecture"): token ids + images in, new token ids + logprobs out.

Engines never see text protocols: the agent loop gives them the full context as token ids (with the
context's images, in order of their vision blocks) and gets back the sampled ids of one assistant turn.
One request per `await engine.generate(request, sampling)`: each trajectory's coroutine awaits its own
turn, and the engine batches internally across every request pending at once (continuous batching in
vLLM's AsyncLLM, a request-level batcher in the HF engine).
"""

from __future__ import annotations

import abc
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "eos"]


@dataclass
class SamplingParams:
    """How to sample one turn.

    `top_k=0` and `top_p=1.0` mean true sampling from the (temperature-scaled) distribution;
    `temperature=0` is greedy. `stop` strings end the turn and stay in the output (`</code>`);
    the turn terminators `<|im_end|>`/eos always end it. `logprobs`: return the log-prob of each sampled
    token under the temperature-scaled, special-token-suppressed distribution (what the learner recomputes).
    `seed`: this request's own sampling seed (the agent loop derives one per chunk, trajectory and turn), so
    its tokens do not depend on which other requests share its batch; None draws from the engine's RNG.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    stop: list[str] = field(default_factory=lambda: ["</code>"])
    logprobs: bool = True
    seed: int | None = None


@dataclass
class GenerationRequest:
    """One sequence to continue: its full context ids and its images (PNG/JPEG bytes or PIL images), in
    the order of the vision blocks in `prompt_ids`. `max_new_tokens` (optional) caps this request below
    the sampling params' cap (the agent loop uses it for the total-length budget)."""

    prompt_ids: list[int]
    images: list[Any] = field(default_factory=list)
    request_id: str = ""
    max_new_tokens: int | None = None


@dataclass
class GenerationOutput:
    """One sampled turn: new ids (stop string included), per-token logprobs (0.0 when not requested),
    why it ended ("stop": a stop string, "eos": a turn terminator, "length": the token cap), and its text."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    text: str = ""


NamedTensors = Mapping[str, Any] | Iterable[tuple[str, Any]]


class GenerationEngine(abc.ABC):
    """A policy that samples turns. `version` is the weight version the engine currently serves."""

    version: int = 0

    @abc.abstractmethod
    async def generate(self, request: GenerationRequest, sampling: SamplingParams) -> GenerationOutput:
        """Sample one turn of one request. Call it concurrently (one coroutine per trajectory): the engine
        batches whatever requests are pending and never blocks the event loop while it computes."""

    @abc.abstractmethod
    def update_weights(self, weights: NamedTensors, version: int) -> None:
        """Load new policy weights (a state dict or (name, tensor) pairs) in place and set `version`."""

    def sleep(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release accelerator memory between rollouts (colocated placement). Optional."""

    def wake(self) -> None:  # noqa: B027 - optional hook
        """Undo `sleep`. Optional."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free resources."""


def named_tensors(weights: NamedTensors) -> Iterable[tuple[str, Any]]:
    """Iterate (name, tensor) pairs from a state dict or an iterable of pairs."""
    if isinstance(weights, Mapping):
        return weights.items()
    return weights


def to_pil(image: Any):
    """A PIL RGB image from PNG/JPEG bytes, a path or a PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, bytes | bytearray | memoryview):
        img = Image.open(io.BytesIO(bytes(image)))
    else:
        img = Image.open(image)
    return img.convert("RGB") if img.mode != "RGB" else img
