"""Verifiers: the strict (release) and lenient answer formats, each kind, and the source registry."""

import math

import pytest

from pyvision_rl.rewards.verifiers import (
    DATA_SOURCE_KINDS,
    JUDGE,
    VERIFIERS,
    extract_answer,
    parse_number,
    register_verifier,
    verifier_for,
    verify,
)


def ans(x: str) -> str:
    return f"<answer>\n\\boxed{{{x}}}\n</answer>"


def test_extract_last_answer_with_nested_braces():
    r = (
        "I think 7.\n<code>\n```python\nprint(3)\n```\n</code>"
        + ans("1")
        + "more"
        + ans("\\frac{3}{\\sqrt{4}}")
    )
    assert extract_answer(r) == "\\frac{3}{\\sqrt{4}}"


def test_extract_fallback_bare_boxed_and_malformed_lenient():
    assert extract_answer("so the answer is \\boxed{42}.", "lenient") == "42"
    assert extract_answer("<answer>\\boxed{42}</answer>", "lenient") == "42"
    assert extract_answer("<answer>\n\\boxed{12\n</answer>", "lenient") is None  # unbalanced
    assert extract_answer("no answer at all, 5 objects", "lenient") is None
    assert extract_answer("", "lenient") is None
    with pytest.raises(ValueError, match="answer_format"):
        extract_answer(ans("1"), "loose")


VB = "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>"


def test_strict_format_and_the_release_zero_rules():
    assert extract_answer(ans("42")) == "42"
    assert extract_answer(ans(" \\frac{1}{2} ")) == "\\frac{1}{2}"  # stripped, nested braces intact
    # the release's regex: newlines around the box are required
    assert extract_answer("<answer>\\boxed{42}</answer>") is None
    assert extract_answer("so the answer is \\boxed{42}.") is None
    assert verify("<answer>\\boxed{42}</answer>", "42", "numeric") == 0.0
    assert verify("<answer>\\boxed{42}</answer>", "42", "numeric", answer_format="lenient") == 1.0
    obs = f"<interpreter>Image Result:\n{VB}</interpreter>"
    assert extract_answer(obs + ans("42")) == "42"
    # vision blocks cut: a start+pad without its pad+end
    assert extract_answer(obs + "<|vision_start|><|image_pad|>" + ans("42")) is None
    # <answer>/</answer> counts differ after the last </interpreter>
    assert extract_answer(obs + "<answer>\n" + ans("42")) is None
    # ... but an unbalanced tag inside an earlier observation does not count
    assert extract_answer("<interpreter><answer></interpreter>" + ans("42")) == "42"
    # the answer may not contain the protocol's tags, and not be 1000 characters long
    assert extract_answer(ans("<interpreter>42")) is None
    assert extract_answer(ans("\\boxed{42}")) is None
    assert extract_answer(ans("x" * 999)) == "x" * 999 and extract_answer(ans("x" * 1000)) is None
    # several blocks: the last one counts (the release takes the first, e.g. one printed by a program)
    printed = "<interpreter>Text Result:\n" + ans("7") + "</interpreter>"
    assert extract_answer(printed + ans("42")) == "42"


def test_malformed_scores_zero_for_every_kind():
    for kind in ["mcq", "numeric", "mra", "math", "string"]:
        assert verify("The answer is 5", "5", kind) == 0.0
        assert verify(ans(""), "5", kind) == 0.0


def test_mcq_letter_text_and_options():
    extra = {"options": ["A. red square", "B. blue circle", "C. green"]}
    assert verify(ans("B"), "B", "mcq") == 1.0
    assert verify(ans("(B)"), "B", "mcq") == 1.0
    assert verify(ans("B. blue circle"), "(B)", "mcq") == 1.0
    assert verify(ans("blue circle"), "B", "mcq", extra) == 1.0  # text -> letter through options
    assert verify(ans("B"), "blue circle", "mcq", extra) == 1.0  # ground truth given as text
    assert verify(ans("A"), "B", "mcq", extra) == 0.0
    assert verify(ans("red square"), "B", "mcq", extra) == 0.0
    assert verify(ans("b"), "B", "mcq", {"options": {"A": "x", "B": "y"}}) == 1.0
    assert verify(ans("Blue circle."), "blue circle", "mcq") == 1.0  # no options: text compare


def test_numeric_tolerance_and_forms():
    assert verify(ans("12"), "12", "numeric") == 1.0
    assert verify(ans("12.00001"), "12", "numeric") == 1.0
    assert verify(ans("12.5"), "12", "numeric") == 0.0
    assert verify(ans("1,024"), "1024", "numeric") == 1.0
    assert verify(ans("\\frac{3}{4}"), "0.75", "numeric") == 1.0
    assert verify(ans("12.5"), "12", "numeric", {"rel_tol": 0.1}) == 1.0
    assert verify(ans("about 12 or 13"), "12", "numeric") == 0.0
    assert parse_number("3.5 meters") == 3.5 and parse_number("nan") is None


def test_mra_matches_vsi_bench_definition_on_boxed_answer():
    # |a-g|/g = 0.12: right for thresholds with 1-θ > 0.12, i.e. θ in 0.50..0.85 -> 8 of 10.
    assert verify(ans("11.2"), "10", "mra") == pytest.approx(0.8)
    assert verify(ans("10"), "10", "mra") == 1.0
    assert verify(ans("30"), "10", "mra") == 0.0
    # 0.049 relative error -> all thresholds but 0.95 (needs < 0.05): 10/10; 0.051 -> 9/10
    assert verify(ans("10.49"), "10", "mra") == 1.0
    assert verify(ans("10.51"), "10", "mra") == pytest.approx(0.9)
    # never the first number of the response: the boxed 30 is what counts
    assert verify("I count 10 chairs... " + ans("30"), "10", "mra") == 0.0
    assert verify(ans("0"), "0", "mra") == 1.0 and verify(ans("1"), "0", "mra") == 0.0


def test_math_symbolic():
    assert verify(ans("\\frac{1}{2}"), "0.5", "math") == 1.0
    assert verify(ans("x^2+1"), "1+x^2", "math") == 1.0
    assert verify(ans("x^2+2"), "1+x^2", "math") == 0.0
    assert verify(ans("\\sqrt{2}/2"), "\\frac{\\sqrt{2}}{2}", "math") == 1.0


def test_string_normalised():
    assert verify(ans("\\text{The Red Car}"), "red car", "string") == 1.0
    assert verify(ans("red car!"), "Red car", "string") == 1.0
    assert verify(ans("blue car"), "red car", "string") == 0.0
    assert verify(ans("5.0"), "5", "string") == 1.0


RELEASE_JUDGED = (
    "vstar vl_agent chart zebra_cot vigorl deepeyes math_8k_verified barc wemath-standard wemath-pro minio3 vsi "
    "longvila ecd v-interaction mathvision hrbench-4k hrbench-8k"
).split()


def test_registry_names_every_release_source():
    for ds in RELEASE_JUDGED:
        assert verifier_for(ds) == JUDGE, ds
    assert verifier_for("VStar") == JUDGE  # case-insensitive
    assert verifier_for("vsi_numerical") == "mra"
    assert verifier_for("scannet_rule_verifiable") == "mra"
    assert verifier_for("never_heard_of") == JUDGE  # unknown sources are judged, as in the release
    assert verifier_for("never_heard_of", "numeric") == "numeric"
    assert verifier_for("vstar", overrides={"vstar": "mcq"}) == "mcq"
    assert DATA_SOURCE_KINDS["synthetic_count"] == "numeric"
    assert DATA_SOURCE_KINDS["synthetic_video_frame"] == "numeric"
    with pytest.raises(ValueError, match="judge"):
        verify(ans("red"), "red", JUDGE)
    register_verifier("always_one", lambda a, g, e: 1.0, data_sources=["my_source"])
    try:
        assert verifier_for("my_source") == "always_one"
        assert verify(ans("anything"), "x", "always_one") == 1.0
    finally:
        VERIFIERS.pop("always_one")
        DATA_SOURCE_KINDS.pop("my_source")
    with pytest.raises(KeyError, match="register_verifier"):
        verify(ans("1"), "1", "no_such_kind")


def test_bad_custom_verifier_is_clamped():
    register_verifier("nan_v", lambda a, g, e: math.nan)
    register_verifier("big_v", lambda a, g, e: 7.0)
    try:
        assert verify(ans("1"), "1", "nan_v") == 0.0
        assert verify(ans("1"), "1", "big_v") == 1.0
    finally:
        VERIFIERS.pop("nan_v")
        VERIFIERS.pop("big_v")
