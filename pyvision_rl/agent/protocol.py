"""The PyVision-RL text protocol: prompts, action parsing, observations, and their token ids.

Byte-compatible with the released PyVision-RL models (README.md, "Fidelity to PyVision-RL"):

- Initial prompt: the Qwen2.5-VL chat template applied to ONE user message. Because the first message is
  not a system message, that template inserts its default system block
  (`<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n`), so the release's prompts carry it;
  `render_prompt` does the same (pass `system_prompt=None` to leave it out). Every `<image>` in the user
  text becomes `<image_clue_k><|vision_start|><|image_pad|>*n<|vision_end|></image_clue_k>`.
- Observations after a code turn, byte-equal to the release's tools (`render_observation`; the release
  renders the figure form through the chat template and strips the system block, hence the leading
  `"\\n"`). Image tool (PyVision-Image), `{out}` the stripped stdout:
    no figure  `"\\n<|im_start|>user\\n<tool_response>\\n<interpreter>\\nText Result:\\n{out}</interpreter>\\n\\n"
                "</tool_response><|im_end|>\\n<|im_start|>assistant\\n"`;
    figures    `"<tool_response>\\n<interpreter>"`, `"Text Result:\\n{out}\\n"` (also when `out` is empty),
                `"Image Result:\\n"`, per figure `"<image_clue_k>"`, image, `"</image_clue_k>"`, then
                `"</interpreter>\\n\\n</tool_response>"`, concatenated with no separator, in the same user turn.
  Video tool (PyVision-Video): no figure `"...<interpreter>\\nText Result:\\n{out}\\n</interpreter>..."`;
  figures as the image tool but `"\\nText Result:\\n{out}\\n"`.
  Errors (`render_error_observation`): `"...<interpreter>Error: {format message}</interpreter>..."` for a turn
  with neither code nor answer, `"...<interpreter>Execution error: {error}</interpreter>..."` otherwise.
  stdout is stripped of surrounding whitespace, as the release's interpreter does.

Token ids are produced by tokenizing the whole rendered string (images already expanded to their
`<|image_pad|>` runs), exactly as the release's processor does, never by re-tokenizing model output.
Untrusted text (the question, stdout, error messages) has any `<|...|>` special-token spelling
neutralised first, so printed text can never turn into a vision token whose features do not exist.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

IMAGE_TEMPLATE_KEY = "vistool_with_img_info_v2"
VIDEO_TEMPLATE_KEY = "vis_tool_with_img_info_video_v4"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
FORMAT_ERROR_MESSAGE = "No Python code or final answer found. There is something wrong with the format."
TIMEOUT_ERROR_MESSAGE = "Execution timeout"
CODE_STOP = "</code>"

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")

_TEMPLATE_DIR = Path(__file__).parent / "templates"
_SPECIAL_SPELLING = re.compile(r"<\|([A-Za-z0-9_]+)\|>")


# ---------------------------------------------------------------- templates and prompts


@functools.cache
def load_templates() -> dict[str, str]:
    """All prompt templates: the release's file plus our `extra_templates.json` (release keys win)."""
    release = json.loads((_TEMPLATE_DIR / "rl_system_prompt_template.json").read_text())
    extra = json.loads((_TEMPLATE_DIR / "extra_templates.json").read_text())
    return {**extra, **release}


def get_template(key: str) -> str:
    """The template text for `key`; a KeyError names the valid keys."""
    templates = load_templates()
    if key not in templates:
        raise KeyError(
            f"prompt template '{key}' not found in pyvision_rl/agent/templates/*.json "
            f"(set rollout.prompt_template to one of: {sorted(templates)})"
        )
    return templates[key]


def build_image_prompt(
    question: str, width: int, height: int, template_key: str = IMAGE_TEMPLATE_KEY, n_images: int = 1
) -> str:
    """The user message text of an image task, byte-equal to the release's: `"<image>\\n" + template`.

    `width`/`height` are the (first) image's pixel size. `n_images > 1` prefixes one `<image>` per input
    image (the release only ever had one).
    """
    body = get_template(template_key).format(query=question, width=str(width), height=str(height))
    return "<image>" * max(n_images - 1, 0) + "<image>\n" + body


def format_video_info(width: int, height: int, n_frames: int, fps: float) -> str:
    """The release's `video_info` block (metadata only; no frame is shown)."""
    return (
        f"Frame Width: {width}; Frame Height: {height};\nVideo Length: {n_frames}; Sample FPS: {fps:.2f}\n"
        "The original video has been read into the global variable `video_clue_0`."
    )


def build_video_prompt(
    question: str, width: int, height: int, n_frames: int, fps: float, template_key: str = VIDEO_TEMPLATE_KEY
) -> str:
    """The user message text of a video task, byte-equal to the release's (no `<image>`, no frames)."""
    info = format_video_info(width, height, n_frames, fps)
    return get_template(template_key).format(query=question, video_info=info)


# ---------------------------------------------------------------- actions


@dataclass(frozen=True)
class Action:
    """What one assistant turn asks for.

    kind: "answer" (a closed `<answer>...</answer>` block), "code" (a python block to run) or "none".
    answer: the content of the last `\\boxed{...}` inside the answer block (nested braces intact), or None
    when the block holds no well-formed box (the verifier then scores it 0). answer_block: the raw block.
    """

    kind: Literal["code", "answer", "none"]
    code: str | None = None
    answer: str | None = None
    answer_block: str | None = None


_CODE_RE = re.compile(r"<code>\s*```python(.*?)```\s*</code>", re.DOTALL)
_FENCE_RE = re.compile(r"```python(.*?)```", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text`, matching braces (so `\\boxed{\\frac{1}{2}}` works)."""
    start = text.rfind("\\boxed{")
    while start != -1:
        i = start + len("\\boxed{")
        depth = 1
        j = i
        while j < len(text):
            c = text[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i:j]
            j += 1
        start = text.rfind("\\boxed{", 0, start)  # unbalanced: try an earlier box
    return None


def _clean_code(code: str) -> str:
    # Drop the newline after ```python and trailing whitespace, keep the first line's indentation.
    return re.sub(r"\A[ \t]*\n", "", code).rstrip()


def parse_action(text: str) -> Action:
    """Parse one assistant turn.

    Precedence follows the release: a closed `<answer>` block wins over code in the same turn (the turn
    then ends the trajectory); with several answer blocks the last one counts. Code is the last
    `<code>\\n```python ...```\\n</code>` block, falling back to the last bare ```python fence; an empty
    code block counts as no code. An unclosed `<answer>` is not an answer.
    """
    answers = _ANSWER_RE.findall(text)
    if answers:
        block = answers[-1]
        return Action(kind="answer", answer=extract_boxed(block), answer_block=block)
    blocks = _CODE_RE.findall(text) or _FENCE_RE.findall(text)
    if blocks:
        code = _clean_code(blocks[-1])
        if code.strip():
            return Action(kind="code", code=code)
    return Action(kind="none")


# ---------------------------------------------------------------- rendering (strings)


def neutralize_special_spellings(text: str) -> str:
    """Break `<|name|>` spellings in untrusted text (printed output, questions) so the tokenizer cannot
    turn them into special tokens; a zero-width joiner goes after `<`. Normal text is unchanged."""
    return _SPECIAL_SPELLING.sub(lambda m: "<\u2060|" + m.group(1) + "|>", text)


def vision_block(n_tokens: int) -> str:
    """`<|vision_start|><|image_pad|>*n<|vision_end|>`: how one image appears in the token stream."""
    if n_tokens <= 0:
        raise ValueError(f"an image must expand to at least one <|image_pad|> token, got {n_tokens}")
    return VISION_START + IMAGE_PAD * n_tokens + VISION_END


def render_prompt(
    user_text: str, image_tokens: list[int], system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
) -> str:
    """The full initial prompt string, as the Qwen2.5-VL chat template renders the release's message.

    The k-th `<image>` in `user_text` becomes `<image_clue_k>` + its vision block + `</image_clue_k>`;
    `image_tokens[k]` is that image's `<|image_pad|>` count. Ends with the generation prompt.
    """
    parts = user_text.split("<image>")
    if len(parts) - 1 != len(image_tokens):
        raise ValueError(
            f"the prompt has {len(parts) - 1} <image> placeholders but {len(image_tokens)} images were given"
        )
    out = [neutralize_special_spellings(parts[0])]
    for k, (n, tail) in enumerate(zip(image_tokens, parts[1:], strict=True)):
        out.append(f"<image_clue_{k}>{vision_block(n)}</image_clue_{k}>")
        out.append(neutralize_special_spellings(tail))
    system = f"<|im_start|>system\n{system_prompt}<|im_end|>\n" if system_prompt is not None else ""
    return system + "<|im_start|>user\n" + "".join(out) + "<|im_end|>\n<|im_start|>assistant\n"


_OBS_HEAD = "\n<|im_start|>user\n"
_OBS_TAIL = "<|im_end|>\n<|im_start|>assistant\n"


def render_observation(
    stdout: str, image_tokens: Sequence[int] = (), first_index: int = 0, kind: str = "image"
) -> str:
    """Observation of a successful execution, byte-equal to the release's image (`kind="image"`) or video
    (`kind="video"`) tool. `image_tokens[k]` is the k-th figure's `<|image_pad|>` count; it is shown as
    `image_clue_{first_index + k}`. stdout is stripped, as the release's interpreter does."""
    if kind not in ("image", "video"):
        raise ValueError(f"observation kind must be 'image' or 'video', got {kind!r}")
    out = neutralize_special_spellings(stdout.strip())
    if not image_tokens:
        sep = "\n" if kind == "video" else ""
        body = f"<tool_response>\n<interpreter>\nText Result:\n{out}{sep}</interpreter>\n\n</tool_response>"
        return _OBS_HEAD + body + _OBS_TAIL
    lead = "\n" if kind == "video" else ""
    parts = ["<tool_response>\n<interpreter>", f"{lead}Text Result:\n{out}\n", "Image Result:\n"]
    for k, n in enumerate(image_tokens):
        idx = first_index + k
        parts.append(f"<image_clue_{idx}>{vision_block(n)}</image_clue_{idx}>")
    parts.append("</interpreter>\n\n</tool_response>")
    return _OBS_HEAD + "".join(parts) + _OBS_TAIL


def render_error_observation(message: str) -> str:
    """Observation fed back after a failed turn, as the release writes it: `Error: ` + the format message
    for a turn with neither code nor answer (`FORMAT_ERROR_MESSAGE`), `Execution error: ` + the message for
    a Python error or a timeout."""
    text = neutralize_special_spellings(message.strip())
    label = "Error: " if message == FORMAT_ERROR_MESSAGE else "Execution error: "
    return (
        f"{_OBS_HEAD}<tool_response>\n<interpreter>{label}{text}</interpreter>\n\n</tool_response>{_OBS_TAIL}"
    )


# ---------------------------------------------------------------- token ids


class ChatTokens:
    """Turns rendered protocol strings into token ids with the policy's tokenizer, and cleans model ids.

    Tokenizing a whole rendered string is exact: the special tokens delimit the text pieces, and this is
    what the release's processor does with the same strings.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        conv = tokenizer.convert_tokens_to_ids
        self.image_pad_id: int = conv(IMAGE_PAD)
        self.vision_start_id: int = conv(VISION_START)
        self.vision_end_id: int = conv(VISION_END)
        self.im_end_id: int = conv("<|im_end|>")
        unk = getattr(tokenizer, "unk_token_id", None)
        ids = set()
        for tok in VISION_TOKENS:
            i = conv(tok)
            if i is not None and i != unk and i >= 0:
                ids.add(i)
        self.vision_ids: frozenset[int] = frozenset(ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of a rendered protocol string (special tokens parsed, none added)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        """Text of ids, special tokens kept (what the parser and the logs see)."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def prompt_ids(
        self, user_text: str, image_tokens: list[int], system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    ) -> list[int]:
        """Token ids of the initial prompt (see `render_prompt`)."""
        return self.encode(render_prompt(user_text, image_tokens, system_prompt))

    def observation_ids(
        self,
        stdout: str,
        image_tokens: Sequence[int] | None = None,
        first_index: int = 0,
        kind: str = "image",
    ) -> list[int]:
        """Token ids of a successful execution's observation (see `render_observation`)."""
        return self.encode(render_observation(stdout, image_tokens or (), first_index, kind))

    def error_ids(self, message: str) -> list[int]:
        """Token ids of an error observation."""
        return self.encode(render_error_observation(message))

    def strip_vision_tokens(self, ids: list[int], logprobs: list[float] | None = None):
        """Remove vision special tokens the model generated itself (they have no image features and would
        break the next forward). Returns (ids, logprobs, n_removed)."""
        keep = [i for i, t in enumerate(ids) if t not in self.vision_ids]
        if len(keep) == len(ids):
            return list(ids), (list(logprobs) if logprobs is not None else None), 0
        new_lp = [logprobs[i] for i in keep] if logprobs is not None else None
        return [ids[i] for i in keep], new_lp, len(ids) - len(keep)

    def count_image_tokens(self, ids: list[int]) -> int:
        """Number of `<|image_pad|>` tokens (visual tokens spent) in `ids`."""
        pad = self.image_pad_id
        return sum(1 for t in ids if t == pad)
