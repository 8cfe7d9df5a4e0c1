"""Answer verifiers: the full response goes in, a score in [0, 1] comes out.

`verify(response, ground_truth, kind)` extracts the model's final answer itself (the content of the LAST
`<answer>\\n\\boxed{...}\\n</answer>`, nested braces intact; a bare `\\boxed{}` as a fallback) and returns 0
for a malformed or missing answer. Which verifier applies to a row is decided by its `data_source` through
`DATA_SOURCE_KINDS` / `verifier_for`; users add their own with `register_verifier`.

A verifier function has the signature of DESIGN §3: `fn(answer, ground_truth, extra) -> float`, where
`answer` is the extracted boxed content and `extra` the row's `Task.extra` (options for multiple choice, a
numeric tolerance, ...). Verifiers are pure and fast; the LLM judge is the one exception and is off by default.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

VerifierFn = Callable[[str, str, Mapping[str, Any]], float]

# ----------------------------------------------------------------------------------------- extraction

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _boxed_contents(text: str) -> list[str]:
    """All `\\boxed{...}` contents in order, with nested braces matched (unbalanced ones are skipped)."""
    out = []
    start = 0
    while True:
        i = text.find("\\boxed{", start)
        if i < 0:
            return out
        j = i + len("\\boxed{")
        depth = 1
        k = j
        while k < len(text) and depth:
            if text[k] == "{":
                depth += 1
            elif text[k] == "}":
                depth -= 1
            k += 1
        if depth == 0:
            out.append(text[j : k - 1])
        start = j


def extract_answer(response: str) -> str | None:
    """The final answer of a response: the boxed content of the last `<answer>` block.

    Falls back to the last balanced `\\boxed{}` anywhere when there is no `<answer>` block with one
    (older prompts, other models). None when nothing can be extracted.
    """
    if not response:
        return None
    for block in reversed(_ANSWER_BLOCK.findall(response)):
        boxed = _boxed_contents(block)
        if boxed:
            return boxed[-1].strip()
    boxed = _boxed_contents(response)
    return boxed[-1].strip() if boxed else None


# ----------------------------------------------------------------------------------------- normalisation

_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mbox|textit)\{([^{}]*)\}")


def _strip_latex(s: str) -> str:
    s = _TEXT_WRAPPERS.sub(r"\1", s)
    s = s.replace("\\%", "%").replace("\\$", "$").replace("$", "").replace("\\,", "").replace("\\!", "")
    return s.strip()


def normalize_text(s: str) -> str:
    """Lower-case, LaTeX text wrappers off, punctuation and articles removed, whitespace collapsed."""
    s = _strip_latex(str(s)).lower()
    s = re.sub(r"[^\w\s.%-]", " ", s)
    s = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", s)  # keep decimal points, drop sentence dots
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


_NUMBER = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?$", re.IGNORECASE)


def parse_number(s: str) -> float | None:
    """A number written as the whole answer: `12`, `-3.5`, `1,024`, `45%`, `3/4`, `\\frac{3}{4}`, `12 m`.

    Only the whole (unit-stripped) answer is parsed, never a number found inside a sentence.
    """
    if s is None:
        return None
    t = _strip_latex(str(s)).strip().rstrip(".").strip()
    m = re.match(r"^\\d?frac\{([^{}]+)\}\{([^{}]+)\}$", t)
    if m:
        t = f"{m.group(1)}/{m.group(2)}"
    # A trailing unit word or percent sign ("12 m", "45%", "3.5 meters") is dropped; other text is not a number.
    m = re.match(r"^([-+\d.,/ ]*\d)\s*(?:%|°|[a-zA-Z]{1,12}(?:\^[23])?)$", t)
    if m:
        t = m.group(1)
    t = t.replace(",", "").replace(" ", "")
    if "/" in t:
        a, _, b = t.partition("/")
        if _NUMBER.match(a) and _NUMBER.match(b) and float(b) != 0:
            return float(a) / float(b)
        return None
    if _NUMBER.match(t):
        v = float(t)
        return v if math.isfinite(v) else None
    return None


# ----------------------------------------------------------------------------------------- verifiers

_LETTER = re.compile(r"^\(?([A-Za-z])\)?(?:[.:)]\s*(.*)|\s+(.*))?$", re.DOTALL)


def _options(extra: Mapping[str, Any]) -> dict[str, str]:
    """Options as {letter: text} from `extra['options']` (list or dict) or `extra['choices']`."""
    opts = extra.get("options", extra.get("choices")) if extra else None
    if not opts:
        return {}
    if isinstance(opts, Mapping):
        return {str(k).strip().strip("()").upper(): str(v) for k, v in opts.items()}
    out = {}
    for i, o in enumerate(opts):
        m = re.match(r"^\(?([A-Z])\)?[.:)]\s*(.*)$", str(o).strip(), re.DOTALL)
        if m:  # "A. cat" style entries keep their own letter
            out[m.group(1)] = m.group(2)
        else:
            out[chr(ord("A") + i)] = str(o)
    return out


def _mcq_letter(s: str, options: dict[str, str]) -> str | None:
    s = _strip_latex(s).strip()
    m = _LETTER.match(s)
    if m and (not options or m.group(1).upper() in options):
        return m.group(1).upper()
    norm = normalize_text(s)
    for letter, text in options.items():
        if norm and norm == normalize_text(text):
            return letter
    return None


def verify_mcq(answer: str, ground_truth: str, extra: Mapping[str, Any]) -> float:
    """Multiple choice: a letter (`B`, `(B)`, `B. text`) or the option's text; ground truth either way."""
    options = _options(extra)
    gt_letter = _mcq_letter(ground_truth, options)
    ans_letter = _mcq_letter(answer, options)
    if gt_letter is not None and ans_letter is not None:
        return float(gt_letter == ans_letter)
    # Without options to map text to letters, compare texts.
    return float(bool(normalize_text(answer)) and normalize_text(answer) == normalize_text(ground_truth))


def verify_numeric(answer: str, ground_truth: str, extra: Mapping[str, Any]) -> float:
    """Numbers equal within `extra['rel_tol']` (default 1e-4) or `extra['abs_tol']` (default 1e-6)."""
    a, g = parse_number(answer), parse_number(ground_truth)
    if a is None or g is None:
        return 0.0
    rel = float(extra.get("rel_tol", 1e-4)) if extra else 1e-4
    abs_ = float(extra.get("abs_tol", 1e-6)) if extra else 1e-6
    return float(math.isclose(a, g, rel_tol=rel, abs_tol=abs_))


MRA_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50, 0.55, ..., 0.95


def verify_mra(answer: str, ground_truth: str, extra: Mapping[str, Any]) -> float:
    """Mean relative accuracy (VSI-Bench): mean over θ in 0.50..0.95 of 1{|a - g| / |g| < 1 - θ}.

    Scored on the boxed answer only. A zero ground truth counts only an exact zero as right.
    """
    a, g = parse_number(answer), parse_number(ground_truth)
    if a is None or g is None:
        return 0.0
    if g == 0:
        return float(a == 0)
    rel = abs(a - g) / abs(g)
    return sum(rel < 1 - t for t in MRA_THRESHOLDS) / len(MRA_THRESHOLDS)


def verify_string(answer: str, ground_truth: str, extra: Mapping[str, Any]) -> float:
    """Normalised exact match; numbers compare numerically when both sides are numbers."""
    a, g = parse_number(answer), parse_number(ground_truth)
    if a is not None and g is not None:
        return float(math.isclose(a, g, rel_tol=1e-6, abs_tol=1e-9))
    na = normalize_text(answer)
    return float(bool(na) and na == normalize_text(ground_truth))


_mv_log = logging.getLogger("math_verify")


def verify_math(answer: str, ground_truth: str, extra: Mapping[str, Any]) -> float:
    """Symbolic equivalence with math-verify (`\\frac{1}{2}` == `0.5`, `x^2+1` == `1+x^2`)."""
    try:
        from math_verify import parse, verify
    except ImportError as e:  # a hard dependency, but say what to do if it is missing
        raise ImportError(
            "the 'math' verifier needs math-verify: pip install -c constraints.txt math-verify"
        ) from e
    # math-verify's timeouts use SIGALRM, which only works on the main thread (Ray may call us elsewhere).
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    level = _mv_log.level
    _mv_log.setLevel(logging.ERROR)  # it warns on every call when the timeout is off
    try:
        gold = parse(f"\\boxed{{{ground_truth}}}", parsing_timeout=timeout)
        pred = parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout)
        if not gold or not pred:
            return verify_string(answer, ground_truth, extra)
        return float(verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # math-verify raises on pathological input; a wrong answer is the safe reading
        return 0.0
    finally:
        _mv_log.setLevel(level)


VERIFIERS: dict[str, VerifierFn] = {
    "mcq": verify_mcq,
    "numeric": verify_numeric,
    "mra": verify_mra,
    "math": verify_math,
    "string": verify_string,
}

# data_source -> verifier kind. Names as they appear in PyVision-RL / verl-style rows (lower-cased).
DATA_SOURCE_KINDS: dict[str, str] = {
    # ours (pyvision_rl.data synthetic tasks)
    "synthetic_count": "numeric",
    "synthetic_color_count": "numeric",
    "synthetic_small_objects": "numeric",
    "synthetic_video_frame": "numeric",
    "synthetic_video_event": "numeric",
    # image: fine-grained perception (multiple choice)
    "vstar": "mcq",
    "vstar_bench": "mcq",
    "hrbench": "mcq",
    "hrbench_4k": "mcq",
    "hrbench_8k": "mcq",
    "mme_realworld": "mcq",
    "mmvp": "mcq",
    "blink": "mcq",
    "deepeyes": "string",
    "chart": "string",
    "chartqa": "string",
    # image: math and reasoning
    "mathvista": "math",
    "mathverse": "math",
    "mathvision": "math",
    "wemath": "mcq",
    "geo3k": "math",
    "geoqa": "math",
    "thinklite": "math",
    "thinklite_vl": "math",
    "dynamath": "math",
    "logicvista": "mcq",
    # video / spatial
    "vsi_bench_numeric": "mra",
    "vsi_bench_mra": "mra",
    "vsi_bench_mcq": "mcq",
    "vsi_bench": "mra",
    "videomme": "mcq",
    "video_mme": "mcq",
    "mvbench": "mcq",
    "longvideobench": "mcq",
    "spacer": "mra",
}


def register_verifier(name: str, fn: VerifierFn, data_sources: Sequence[str] = ()) -> None:
    """Add (or replace) a verifier kind, optionally routing `data_sources` to it."""
    if not callable(fn):
        raise TypeError(
            f"register_verifier('{name}'): fn must be callable (answer, ground_truth, extra) -> float"
        )
    VERIFIERS[name] = fn
    for ds in data_sources:
        DATA_SOURCE_KINDS[ds.lower()] = name


def verifier_for(data_source: str, default: str = "string") -> str:
    """The verifier kind for a data_source (case-insensitive), or `default` when it is not registered."""
    kind = DATA_SOURCE_KINDS.get((data_source or "").lower(), default)
    if kind not in VERIFIERS:
        raise KeyError(
            f"verifier kind '{kind}' (data_source '{data_source}') is not registered; known kinds: "
            f"{sorted(VERIFIERS)}. Set reward.default_verifier or call register_verifier()."
        )
    return kind


def verify(response: str, ground_truth: str, kind: str, extra: Mapping[str, Any] | None = None) -> float:
    """Score a full model response against the ground truth with verifier `kind`.

    The boxed answer of the last `<answer>` block is extracted here; a missing or malformed answer scores 0.
    `extra` is the row's `Task.extra` (e.g. `options` for multiple choice). The result is clamped to [0, 1]
    and a NaN becomes 0, so a buggy custom verifier cannot poison a batch.
    """
    if kind not in VERIFIERS:
        raise KeyError(
            f"unknown verifier kind '{kind}'; known: {sorted(VERIFIERS)} (register_verifier adds one)"
        )
    answer = extract_answer(response)
    if answer is None or answer == "":
        return 0.0
    score = float(VERIFIERS[kind](answer, str(ground_truth), extra or {}))
    if not math.isfinite(score):
        return 0.0
    return min(1.0, max(0.0, score))


# ----------------------------------------------------------------------------------------- LLM judge

JUDGE_PROMPT = (
    "You are grading an answer to a question. Reply with exactly one word: CORRECT or INCORRECT.\n\n"
    "Question: {question}\nReference answer: {ground_truth}\nModel answer: {answer}\n\nVerdict:"
)


class LLMJudgeVerifier:
    """Asks a generation engine whether an answer matches the reference (off by default: reward.llm_judge).

    `engine` is any object with `generate(requests, sampling)` (a GenerationEngine, or a Ray actor handle
    whose `generate.remote` is then used). `make_request(prompt_text)` builds one request for that engine
    (token ids + no images, with the judge model's tokenizer); `read_output(output)` returns its text.
    Register an instance with `register_verifier("llm_judge", judge)`; it has the verifier signature.
    """

    def __init__(
        self,
        engine: Any,
        make_request: Callable[[str], Any],
        read_output: Callable[[Any], str],
        sampling: Any = None,
        prompt: str = JUDGE_PROMPT,
    ) -> None:
        self.engine = engine
        self.make_request = make_request
        self.read_output = read_output
        self.sampling = sampling if sampling is not None else {"temperature": 0.0, "max_new_tokens": 8}
        self.prompt = prompt

    def judge_many(self, items: Sequence[tuple[str, str, str]]) -> list[float]:
        """Score (question, answer, ground_truth) triples in one batched generate call."""
        requests = [
            self.make_request(self.prompt.format(question=q, answer=a, ground_truth=g)) for q, a, g in items
        ]
        gen = self.engine.generate
        if hasattr(gen, "remote"):
            import ray

            outputs = ray.get(gen.remote(requests, self.sampling))
        else:
            outputs = gen(requests, self.sampling)
        scores = []
        for out in outputs:
            text = self.read_output(out).strip().upper()
            scores.append(float(text.startswith("CORRECT")))
        return scores

    def __call__(self, answer: str, ground_truth: str, extra: Mapping[str, Any]) -> float:
        return self.judge_many([(str(extra.get("question", "")), answer, ground_truth)])[0]
