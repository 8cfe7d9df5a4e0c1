"""The text protocol, byte for byte against the release's rendering path, and the action parser."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from helpers import png
from PIL import Image

from pyvision_rl.agent.protocol import (
    FORMAT_ERROR_MESSAGE,
    TIMEOUT_ERROR_MESSAGE,
    ChatTokens,
    build_image_prompt,
    build_video_prompt,
    extract_boxed,
    parse_action,
    render_error_observation,
    render_observation,
    render_prompt,
)

RELEASE = Path("/work/shared/pyvision-protocol/rl_system_prompt_template.json")
TEMPLATES = Path(__file__).resolve().parents[2] / "pyvision_rl/agent/templates/rl_system_prompt_template.json"


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from pyvision_rl.models import load_processor

    return load_processor(tiny_model_dir)


# ---------------------------------------------------------------- prompts


def test_release_template_file_is_unchanged():
    if RELEASE.is_file():
        assert TEMPLATES.read_bytes() == RELEASE.read_bytes()
    keys = json.loads(TEMPLATES.read_text())
    assert "vistool_with_img_info_v2" in keys and "vis_tool_with_img_info_video_v4" in keys


def test_image_prompt_is_image_tag_plus_formatted_release_template():
    tpl = json.loads(TEMPLATES.read_text())["vistool_with_img_info_v2"]
    text = build_image_prompt("What colour is the car?", 640, 480)
    assert text == "<image>\n" + tpl.format(query="What colour is the car?", width="640", height="480")
    assert text.startswith("<image>\nYou are an agent - please keep going")
    assert "Image Width: 640; Image Height: 480\n" in text
    # `{{`/`}}` are str.format escapes: single braces come out
    assert "\\boxed{'The final answer goes here.'}" in text and "{{" not in text
    assert text.endswith("<answer>\n\\boxed{'The final answer goes here.'}\n</answer>")


def test_video_prompt_carries_metadata_only():
    text = build_video_prompt("When does it turn red?", 320, 240, 150, 29.97)
    info = (
        "Frame Width: 320; Frame Height: 240;\nVideo Length: 150; Sample FPS: 29.97\n"
        "The original video has been read into the global variable `video_clue_0`."
    )
    assert f"*Video Information:*\n\n{info}\n\n*User Question:*" in text
    assert "<image>" not in text and "When does it turn red?" in text


def test_prompt_bytes_and_ids_match_the_release_chat_template_path(processor):
    """The release: messages with <image_clue_0>/image/</image_clue_0> parts -> processor.apply_chat_template
    -> processor(text, images). Our render + whole-string tokenization must give the same string and ids."""
    image = png(112, 84, (10, 200, 30))
    user = build_image_prompt("How many {red} squares?", 112, 84, "tiny_tool")
    parts = re.split("(<image>)", user)
    content = []
    for seg in parts:
        if seg == "<image>":
            content += [
                {"type": "text", "text": "<image_clue_0>"},
                {"type": "image"},
                {"type": "text", "text": "</image_clue_0>"},
            ]
        else:
            content.append({"type": "text", "text": seg})
    release_str = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    img = Image.open(io.BytesIO(image)).convert("RGB")
    release_ids = processor(text=[release_str], images=[img], return_tensors="pt")["input_ids"][0].tolist()

    from pyvision_rl.models.processing import encode_images, image_token_count

    _, grids = encode_images(processor, [image])
    n = image_token_count(grids[0], 2)
    ours = render_prompt(user, [n])
    assert ours == release_str.replace("<|image_pad|>", "<|image_pad|>" * n)
    assert ours.startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<image_clue_0><|vision_start|><|image_pad|>"
    )
    assert ours.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert ChatTokens(processor.tokenizer).prompt_ids(user, [n]) == release_ids


# ---------------------------------------------------------------- observations


HEAD, TAIL = (
    "\n<|im_start|>user\n<tool_response>\n",
    "\n\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
)


def test_text_and_error_observations_are_the_release_strings():
    # the release's image tool (safe_persis_python_exe_tool_w_image_hint) and video tool (..._wo_video_hint)
    assert render_observation("  42\n") == HEAD + "<interpreter>\nText Result:\n42</interpreter>" + TAIL
    assert render_observation("") == HEAD + "<interpreter>\nText Result:\n</interpreter>" + TAIL
    assert (
        render_observation(" 42 ", kind="video")
        == HEAD + "<interpreter>\nText Result:\n42\n</interpreter>" + TAIL
    )
    assert (
        render_observation("", kind="video") == HEAD + "<interpreter>\nText Result:\n\n</interpreter>" + TAIL
    )
    assert render_error_observation(FORMAT_ERROR_MESSAGE) == (
        HEAD + "<interpreter>Error: No Python code or final answer found. "
        "There is something wrong with the format.</interpreter>" + TAIL
    )
    assert render_error_observation("NameError: name 'x' is not defined") == (
        HEAD + "<interpreter>Execution error: NameError: name 'x' is not defined</interpreter>" + TAIL
    )
    assert render_error_observation(TIMEOUT_ERROR_MESSAGE) == (
        HEAD + "<interpreter>Execution error: Execution timeout</interpreter>" + TAIL  # the release's worker
    )
    with pytest.raises(ValueError, match="kind"):
        render_observation("x", kind="audio")


def _release_figure_observation(tok, stdout: str, kind: str) -> str:
    """The release's figure observation: content parts through apply_chat_template, system block stripped."""
    out = stdout.strip()  # the release's interpreter strips stdout, and always writes the text part
    lead = "\n" if kind == "video" else ""
    content = [
        {"type": "text", "text": "<tool_response>\n<interpreter>"},
        {"type": "text", "text": f"{lead}Text Result:\n{out}\n"},
        {"type": "text", "text": "Image Result:\n"},
    ]
    for k in (1, 2):
        content += [
            {"type": "text", "text": f"<image_clue_{k}>"},
            {"type": "image"},
            {"type": "text", "text": f"</image_clue_{k}>"},
        ]
    content.append({"type": "text", "text": "</interpreter>\n\n</tool_response>"})
    s = tok.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    s = re.sub(r"<\|im_start\|>system.*?<\|im_end\|>", "", s, flags=re.S)
    return s.replace("<|image_pad|>", "<|image_pad|>" * 4, 1).replace(
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|vision_start|>" + "<|image_pad|>" * 9 + "<|vision_end|>",
    )


def test_figure_observation_equals_release_chat_rendering(processor):
    tok = processor.tokenizer
    for kind in ("image", "video"):
        for stdout in (
            "3 squares\n",
            "",
        ):  # an empty stdout (a bare plt.show() cell) keeps "Text Result:\n\n"
            s = _release_figure_observation(tok, stdout, kind)
            assert render_observation(stdout, [4, 9], first_index=1, kind=kind) == s
    assert "<interpreter>Text Result:\n\nImage Result:\n<image_clue_1>" in render_observation("", [4, 9], 1)
    assert "<interpreter>\nText Result:\n\nImage Result:\n" in render_observation("", [4], 1, kind="video")


def test_observation_ids_have_exact_vision_groups_and_printed_specials_are_neutral(processor):
    from pyvision_rl.models.processing import vision_groups

    ct = ChatTokens(processor.tokenizer)
    ids = ct.observation_ids("print <|image_pad|><|vision_start|> <|im_end|>", [4, 9], first_index=1)
    assert vision_groups(ids, processor.tokenizer) == [4, 9]
    text_ids = ct.observation_ids("<|image_pad|> x <|im_start|>")
    assert ct.image_pad_id not in text_ids
    # only the two real ones (the user turn and the assistant generation prompt)
    assert text_ids.count(processor.tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2
    assert ct.error_ids("boom") == ct.encode(render_error_observation("boom"))
    assert ct.observation_ids("x", [4], 0, kind="video") == ct.encode(
        render_observation("x", [4], 0, kind="video")
    )


def test_strip_vision_tokens_removes_only_vision_ids(processor):
    ct = ChatTokens(processor.tokenizer)
    a = ct.encode("hello")
    ids = a + [ct.vision_start_id, ct.image_pad_id, ct.image_pad_id, ct.vision_end_id] + a + [ct.im_end_id]
    lps = [float(-i) for i in range(len(ids))]
    out, out_lp, n = ct.strip_vision_tokens(ids, lps)
    assert n == 4 and out == a + a + [ct.im_end_id]
    assert out_lp == [lp for t, lp in zip(ids, lps, strict=True) if t not in ct.vision_ids]


# ---------------------------------------------------------------- parser


CODE = "<code>\n```python\nprint(1)\n```\n</code>"


@pytest.mark.parametrize(
    "text,kind,code,answer",
    [
        ("Let me look.\n" + CODE, "code", "print(1)", None),
        (
            "<code>\n```python\nx = 1\n```\n</code> then <code>\n```python\n  y = 2\nprint(y)\n```\n</code>",
            "code",
            "  y = 2\nprint(y)",
            None,
        ),
        ("no tags but a fence ```python\nprint(3)\n``` here", "code", "print(3)", None),
        ("<answer>\n\\boxed{\\frac{1}{2}}\n</answer>", "answer", None, "\\frac{1}{2}"),
        ("<answer>\n\\boxed{A}\n</answer> and also " + CODE, "answer", None, "A"),  # answer wins
        (
            "<answer>\n\\boxed{1}\n</answer>\n<answer>\n\\boxed{2}\n</answer>",
            "answer",
            None,
            "2",
        ),  # last wins
        ("<answer>\nno box here\n</answer>", "answer", None, None),
        ("<answer>\n\\boxed{7}\n", "none", None, None),  # unclosed answer
        ("<code>\n```python\nprint(1)\n", "none", None, None),  # unclosed code, no fence end
        ("<code>\n```python\n\n```\n</code>", "none", None, None),  # empty code
        ("I think it is 4.", "none", None, None),
        ("", "none", None, None),
    ],
)
def test_parse_action(text, kind, code, answer):
    a = parse_action(text)
    assert a.kind == kind
    assert a.code == code
    assert a.answer == answer


def test_extract_boxed_nested_and_unbalanced():
    assert extract_boxed("\\boxed{a{b{c}}d}") == "a{b{c}}d"
    assert extract_boxed("\\boxed{1} then \\boxed{2") == "1"  # the last box is unbalanced: use the earlier
    assert extract_boxed("nothing") is None
