"""Verifiers, the LLM judge, the accumulative tool reward, and the oversample -> filter -> rank selection."""

from pyvision_rl.rewards.filters import DROP_REASONS, select_for_training
from pyvision_rl.rewards.judge import EngineJudge, HTTPJudge, parse_judgement
from pyvision_rl.rewards.verifiers import (
    DATA_SOURCE_KINDS,
    JUDGE,
    VERIFIERS,
    accumulative_tool_reward,
    extract_answer,
    register_verifier,
    score_batch,
    score_trajectory,
    verifier_for,
    verify,
)

__all__ = [
    "DATA_SOURCE_KINDS",
    "DROP_REASONS",
    "JUDGE",
    "VERIFIERS",
    "EngineJudge",
    "HTTPJudge",
    "accumulative_tool_reward",
    "extract_answer",
    "parse_judgement",
    "register_verifier",
    "score_batch",
    "score_trajectory",
    "select_for_training",
    "verifier_for",
    "verify",
]
