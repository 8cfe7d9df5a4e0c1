"""Answer verifiers and trajectory scoring: the full response goes in, a score in [0, 1] comes out;
`score_batch` sets each trajectory's accuracy and its accumulative tool reward
R = R_acc + c · n_tool · 1{right}.

`verify(response, ground_truth, kind)` extracts the model's final answer itself and returns 0 for a
malformed or missing answer. Two answer formats (`reward.answer_format`):
- `strict` (default, the release's `multi_task_verifier`): the answer is `<answer>\\n\\boxed{...}\\n</answer>`
  exactly (regex `<answer>\\n\\\\boxed\\{(.*?)\\}\\n</answer>`), and the score is 0 when the response's
  `<|vision_start|><|image_pad|>` and `<|image_pad|><|vision_end|>` counts differ, when `<answer>` and
  `</answer>` counts differ after the last `</interpreter>`, when the answer contains `<interpreter>`,
  `<answer>` or `\\boxed`, or when it has 1000 characters or more. We take the LAST such block (the
  release takes the first, which can be an `<answer>` a program printed in an observation).
- `lenient` (for evaluating other models): the last balanced `\\boxed{}` of the last `<answer>` block, else
  the last one anywhere; no zero rules.

Which verifier applies to a row is decided by its `data_source` through `DATA_SOURCE_KINDS` /
`verifier_for` (every source the release names is there; `*_rule_verifiable` goes to MRA); users add their
own with `register_verifier` or `reward.verifiers`. Kind `judge` (the LLM judge, `rewards.judge`) is not a
function here: `score_batch` batches those answers to the judge.

A verifier function has the signature of the README's "Architecture" contracts: `fn(answer, ground_truth, extra) -> float`, where
`answer` is the extracted boxed content and `extra` the trajectory's extra (a copy of `Task.extra`: options
for multiple choice, a numeric tolerance, the question...). Verifiers are pure and fast.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pyvision_rl.agent.protocol import extract_boxed  # the one brace matcher (the loop uses it too)
from pyvision_rl.config import RewardConfig
from pyvision_rl.types import EndReason, Trajectory

VerifierFn = Callable[[str, str, Mapping[str, Any]], float]

# ----------------------------------------------------------------------------------------- extraction

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _lenient_answer(response: str) -> str | None:
    for block in reversed(_ANSWER_BLOCK.findall(response)):
        boxed = extract_boxed(block)
        if boxed is not None:
            return boxed.strip()
    boxed = extract_boxed(response)
    return boxed.strip() if boxed is not None else None


_STRICT_ANSWER = re.compile(r"<answer>\n\\boxed\{(.*?)\}\n</answer>", re.DOTALL)
MAX_ANSWER_CHARS = 1000  # the release zeroes answers this long (judge hacking)


def strict_answer(response: str) -> str | None:
    """The answer under the release's strict format and zero rules, or None when they give a 0."""
    if response.count("<|vision_start|><|image_pad|>") != response.count("<|image_pad|><|vision_end|>"):
        return None  # a vision block was cut
    tail = response.split("</interpreter>")[-1]
    if tail.count("<answer>") != tail.count("</answer>"):
        return None
    found = _STRICT_ANSWER.findall(response)
    if not found:
        return None
    answer = found[-1].strip()
    if any(s in answer for s in ("<interpreter>", "<answer>", "\\boxed")) or len(answer) >= MAX_ANSWER_CHARS:
        return None
    return answer


def extract_answer(response: str, answer_format: str = "strict") -> str | None:
    """The final answer of a response under `answer_format` ("strict" | "lenient"); None when there is none.

    strict: the release's format and zero rules (module docstring). lenient: the boxed content of the last
    `<answer>` block (nested braces intact), falling back to the last balanced `\\boxed{}` anywhere.
    """
    if not response:
        return None
    if answer_format == "strict":
        return strict_answer(response)
    if answer_format == "lenient":
        return _lenient_answer(response)
    raise ValueError(f"reward.answer_format must be 'strict' or 'lenient', got {answer_format!r}")


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
    """Numbers equal within `extra['rel_tol']` (default 1e-4) or `extra['abs_tol']` (alias `tolerance`,
    default 1e-6)."""
    a, g = parse_number(answer), parse_number(ground_truth)
    if a is None or g is None:
        return 0.0
    extra = extra or {}
    rel = float(extra.get("rel_tol", 1e-4))
    abs_ = float(extra.get("abs_tol", extra.get("tolerance", 1e-6)))
    return float(math.isclose(a, g, rel_tol=rel, abs_tol=abs_))


MRA_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50, 0.55, ..., 0.95


def verify_mra(answer: str, ground_truth: str, extra: Mapping[str, Any]) -> float:
    """Mean relative accuracy (VSI-Bench): mean over θ in 0.50..0.95 of 1{|a - g| / |g| < 1 - θ}.

    Scored on the boxed answer only (the release's `compute_score_rule_mra` takes the first number anywhere in
    the response, e.g. a "5" the code printed, a bug we do not copy). A zero ground truth counts only an exact
    zero as right. A score >= 0.5 counts as right for the tool bonus (`is_right`).
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
log = logging.getLogger("pyvision_rl.reward")


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

JUDGE = "judge"  # the LLM judge (rewards.judge), batched by score_batch
MRA_RIGHT = 0.5  # an MRA score this high counts as right for the tool bonus (the release's is_answer_right)

# data_source -> verifier kind (lower-cased names).
DATA_SOURCE_KINDS: dict[str, str] = {
    # The release's sources (verl `_default_compute_score`): judged by an LLM ...
    **dict.fromkeys(
        [
            "vstar",
            "vl_agent",
            "chart",
            "zebra_cot",
            "vigorl",
            "deepeyes",
            "math_8k_verified",
            "barc",
            "wemath-standard",
            "wemath-pro",
            "minio3",
            "vsi",
            "longvila",
            "ecd",
            "v-interaction",
            "mathvision",
            "hrbench-4k",
            "hrbench-8k",
        ],
        JUDGE,
    ),
    # ... or by mean relative accuracy (also every `*_rule_verifiable` source, see verifier_for).
    "vsi_numerical": "mra",
    # ours (pyvision_rl.data synthetic tasks)
    "synthetic_count": "numeric",
    "synthetic_color_count": "numeric",
    "synthetic_small_objects": "numeric",
    "synthetic_video_frame": "numeric",
    "synthetic_video_event": "numeric",
    # ours, rule-verified benchmarks the release does not train on (evaluation of other models)
    "vstar_bench": "mcq",
    "hrbench": "mcq",
    "hrbench_4k": "mcq",
    "hrbench_8k": "mcq",
    "mme_realworld": "mcq",
    "mmvp": "mcq",
    "blink": "mcq",
    "chartqa": "string",
    "mathvista": "math",
    "mathverse": "math",
    "wemath": "mcq",
    "geo3k": "math",
    "geoqa": "math",
    "thinklite": "math",
    "thinklite_vl": "math",
    "dynamath": "math",
    "logicvista": "mcq",
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


def verifier_for(data_source: str, default: str = JUDGE, overrides: Mapping[str, str] | None = None) -> str:
    """The verifier kind for a data_source (case-insensitive): `overrides` (reward.verifiers), then the
    registry, then `*_rule_verifiable` -> MRA, then `default` (the release judges unknown sources)."""
    ds = (data_source or "").lower()
    kind = (overrides or {}).get(ds) or DATA_SOURCE_KINDS.get(ds)
    if kind is None:
        kind = "mra" if ds.endswith("_rule_verifiable") else default
    if kind not in VERIFIERS and kind != JUDGE:
        raise KeyError(
            f"verifier kind '{kind}' (data_source '{data_source}') is not registered; known kinds: "
            f"{sorted([*VERIFIERS, JUDGE])}. Set reward.default_verifier / reward.verifiers or call register_verifier()."
        )
    return kind


def is_right(kind: str, acc: float) -> bool:
    """Whether a score counts as a right answer (the tool bonus's condition): MRA >= 0.5, else acc == 1."""
    return acc >= (MRA_RIGHT if kind == "mra" else 1.0 - 1e-9)


def verify(
    response: str,
    ground_truth: str,
    kind: str,
    extra: Mapping[str, Any] | None = None,
    answer_format: str = "strict",
) -> float:
    """Score a full model response against the ground truth with verifier `kind`.

    The answer is extracted here under `answer_format` (strict: the release's format and zero rules); a
    missing or malformed answer scores 0. `extra` is the trajectory's extra (e.g. `options` for multiple
    choice). The result is clamped to [0, 1] and a NaN becomes 0, so a buggy custom verifier cannot poison
    a batch. Kind `judge` needs a judge: use `score_batch`.
    """
    if kind == JUDGE:
        raise ValueError(
            "kind 'judge' is scored by rewards.verifiers.score_batch with a judge (reward.judge)"
        )
    if kind not in VERIFIERS:
        raise KeyError(
            f"unknown verifier kind '{kind}'; known: {sorted(VERIFIERS)} (register_verifier adds one)"
        )
    answer = extract_answer(response, answer_format)
    if answer is None or answer == "":
        return 0.0
    score = float(VERIFIERS[kind](answer, str(ground_truth), extra or {}))
    if not math.isfinite(score):
        return 0.0
    return min(1.0, max(0.0, score))


# ----------------------------------------------------------------------------------------- scoring


def accumulative_tool_reward(
    acc: float, n_tool_calls: int, c: float = 0.1, cap: int = 0, right: bool | None = None
) -> float:
    """`acc + c * n_tool_calls` when the answer is right, else `acc`.

    `right` defaults to `acc == 1` (an MRA score is right from 0.5: pass `verifiers.is_right`).
    `n_tool_calls` counts successfully executed code turns; `cap` > 0 bounds it. A NaN accuracy counts as 0.
    """
    if acc is None or not math.isfinite(acc):
        acc, right = 0.0, False
    if right is None:
        right = acc >= 1.0 - 1e-9
    n = max(0, int(n_tool_calls))
    if cap > 0:
        n = min(n, cap)
    return float(acc + c * n) if right else float(acc)


def trajectory_kind(traj: Trajectory, cfg: RewardConfig) -> str:
    """The verifier kind for a trajectory: `traj.extra['verifier']` if set, else by its data_source."""
    kind = traj.extra.get("verifier") if traj.extra else None
    return kind or verifier_for(traj.data_source, cfg.default_verifier, cfg.verifiers)


def score_batch(trajs: Sequence[Trajectory], cfg: RewardConfig, judge: Any = None) -> dict[str, int]:
    """Set `acc` and `reward` on every trajectory; judged ones go to `judge` in one batched call.

    Only a trajectory that ended with an answer (DONE) can be right: in the others the text after the last
    model turn is an observation, and a program could print an `<answer>` block there. `traj.extra` (a copy
    of Task.extra: options, tolerances, the question) is handed to the verifier. `judge` has
    `judge_many([(question, answer, ground_truth, data_source)]) -> [score or None]`; None (the judge failed
    or its reply was unreadable) scores 0 and is counted. Returns `{"judged": n, "judge_failures": n}`.
    """
    pending: list[tuple[Trajectory, tuple[str, str, str, str]]] = []
    for t in trajs:
        t.acc, kind = 0.0, trajectory_kind(t, cfg)
        if t.end_reason == EndReason.DONE or t.end_reason == EndReason.DONE.value:
            if kind == JUDGE:
                answer = extract_answer(t.response_text, cfg.answer_format)
                if answer:
                    q = str((t.extra or {}).get("question", ""))
                    pending.append((t, (q, answer, str(t.ground_truth), t.data_source)))
            else:
                t.acc = verify(t.response_text, t.ground_truth, kind, t.extra, cfg.answer_format)
        _set_reward(t, kind, cfg)
    failures = 0
    if pending:
        if judge is None:
            raise RuntimeError(
                f"data_source '{pending[0][0].data_source}' is judged by an LLM but no judge is configured: set "
                "reward.judge.backend=http (with reward.judge.base_url and model) or =engine, or route the "
                "source to a rule verifier with reward.verifiers.<source>=mcq|numeric|mra|math|string."
            )
        scores = judge.judge_many([item for _, item in pending])
        for (t, _), s in zip(pending, scores, strict=True):
            if s is None:
                failures += 1
                t.extra["judge_failed"] = True
            t.acc = float(s or 0.0)
            _set_reward(t, JUDGE, cfg)
        if failures:
            log.warning("LLM judge failed on %d of %d answers (scored 0)", failures, len(pending))
    return {"judged": len(pending), "judge_failures": failures}


def _set_reward(t: Trajectory, kind: str, cfg: RewardConfig) -> None:
    t.reward = accumulative_tool_reward(
        t.acc, t.n_tool_calls, cfg.tool_bonus, cfg.tool_bonus_cap, is_right(kind, t.acc)
    )


def score_trajectory(traj: Trajectory, cfg: RewardConfig, judge: Any = None) -> Trajectory:
    """Score one trajectory (see `score_batch`); returns it."""
    score_batch([traj], cfg, judge)
    return traj
