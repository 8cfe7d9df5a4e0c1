"""Verifiers, the accumulative tool reward, the oversampling filters and the group-std ranking."""

from pyvision_rl.rewards.filters import DROP_REASONS, filter_groups, group_by_id, group_std, rank_by_group_std
from pyvision_rl.rewards.tool_reward import accumulative_tool_reward, score_trajectory
from pyvision_rl.rewards.verifiers import (
    DATA_SOURCE_KINDS,
    VERIFIERS,
    LLMJudgeVerifier,
    extract_answer,
    register_verifier,
    verifier_for,
    verify,
)

__all__ = [
    "DATA_SOURCE_KINDS",
    "DROP_REASONS",
    "LLMJudgeVerifier",
    "VERIFIERS",
    "accumulative_tool_reward",
    "extract_answer",
    "filter_groups",
    "group_by_id",
    "group_std",
    "rank_by_group_std",
    "register_verifier",
    "score_trajectory",
    "verifier_for",
    "verify",
]
