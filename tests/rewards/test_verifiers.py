"""Verifiers: extraction of the last boxed answer, each kind, the registry, and the LLM judge seam."""

import math

import pytest

from pyvision_rl.rewards.verifiers import (
    DATA_SOURCE_KINDS,
    VERIFIERS,
    LLMJudgeVerifier,
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


def test_extract_fallback_bare_boxed_and_malformed():
    assert extract_answer("so the answer is \\boxed{42}.") == "42"
    assert extract_answer("<answer>\n\\boxed{12\n</answer>") is None  # unbalanced
    assert extract_answer("no answer at all, 5 objects") is None
    assert extract_answer("") is None


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


def test_registry_and_data_sources():
    assert DATA_SOURCE_KINDS["synthetic_count"] == "numeric"
    assert DATA_SOURCE_KINDS["synthetic_video_frame"] == "numeric"
    assert verifier_for("VStar") == "mcq"
    assert verifier_for("never_heard_of", "numeric") == "numeric"
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


class _EchoJudgeEngine:
    """A real (tiny) engine stand-in: answers CORRECT when the prompt's model answer equals the reference."""

    def __init__(self):
        self.calls = 0

    def generate(self, requests, sampling):
        self.calls += 1
        outs = []
        for prompt in requests:
            ref = prompt.split("Reference answer: ")[1].split("\n")[0]
            got = prompt.split("Model answer: ")[1].split("\n")[0]
            outs.append({"text": "CORRECT" if ref.lower() == got.lower() else "INCORRECT"})
        return outs


def test_llm_judge_verifier_batches_through_engine():
    engine = _EchoJudgeEngine()
    judge = LLMJudgeVerifier(engine, make_request=lambda p: p, read_output=lambda o: o["text"])
    assert judge.judge_many([("q", "Paris", "paris"), ("q", "Rome", "paris")]) == [1.0, 0.0]
    assert engine.calls == 1
    register_verifier("llm_judge", judge)
    try:
        assert verify(ans("Paris"), "paris", "llm_judge", {"question": "capital?"}) == 1.0
    finally:
        VERIFIERS.pop("llm_judge")
