"""The video demo (configs/tiny_cpu_video.yaml): its tokenizer, its 1 fps baseline, and a shortened run.

The shortened run is the demo's own path (tiny model -> scripted SFT with half naive sampling -> RL through
every actor on local Ray) with fewer tasks and steps; it must move the way the full demo does: sampled
accuracy up, visual tokens per trajectory down and far under uniform 1 fps, tool calls kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyvision_rl.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
    """The tiny model `pyvision-rl train` builds for the video config (its own vocabulary) and a few
    video_moment tasks."""
    from pyvision_rl.trainer import prepare_data, prepare_model

    out = tmp_path_factory.mktemp("video")
    cfg = load_config(
        REPO / "configs/tiny_cpu_video.yaml",
        [
            f"run.output_dir={out}",
            "data.synthetic.n_train=6",
            "data.synthetic.n_eval=2",
            "sandbox.backend=process",
        ],
    )
    model = prepare_model(cfg)
    train, _ = prepare_data(cfg)
    return cfg, model, train


def test_expert_trajectories_copy_one_token(video_run):
    """Through the real loop and sandbox: the seek expert shows one frame, the naive one four; in every
    trajectory the boxed digit is the same single token as the digit printed in the observation (the copy
    the tiny model has to learn), and the prompt shows no frame."""
    from pyvision_rl.models.loading import load_processor
    from pyvision_rl.sft import expert_trajectories

    cfg, model, train = video_run
    trajs = expert_trajectories(cfg, str(model), train, tool_fraction=0.5, seed=1)
    assert len(trajs) == len(train)
    tok = load_processor(model).tokenizer
    assert {t.n_tool_images for t in trajs} == {1, 4}
    for t in trajs:
        digit = tok.convert_tokens_to_ids(t.final_answer)
        obs = [i for i, m in zip(t.response_ids, t.loss_mask, strict=True) if m == 0]
        assert digit in obs and t.response_ids[-3] == digit, t.response_text
        assert t.visual_tokens == 16 * t.n_tool_images and t.end_reason.value == "DONE"
        assert (t.final_answer == t.ground_truth) or t.n_tool_images == 4
    assert max(len(t.prompt_ids) + len(t.response_ids) for t in trajs) < 256  # the vocabulary merges texts


def test_uniform_1fps_baseline_counts_every_second(video_run):
    from pyvision_rl.data.video import probe_video
    from pyvision_rl.demo import uniform_1fps_visual_tokens

    cfg, model, train = video_run
    seconds = [probe_video(t.videos[0]).n_frames // 2 for t in train]
    assert uniform_1fps_visual_tokens(model, cfg, train) == pytest.approx(16 * sum(seconds) / len(seconds))
    assert uniform_1fps_visual_tokens(model, cfg, [t for t in train if not t.videos]) is None


@pytest.mark.slow
def test_shortened_video_demo_learns_to_seek(tmp_path):
    from pyvision_rl.demo import run_demo

    cfg = load_config(
        REPO / "configs/tiny_cpu_video.yaml",
        [
            f"run.output_dir={tmp_path}",
            "sandbox.backend=process",
            "logging.wandb=disabled",
            "logging.progress=false",
            "ray.include_dashboard=false",
            "data.synthetic.n_train=96",
            "data.synthetic.n_eval=8",
            "sft.max_tasks=96",
            "sft.steps=200",  # the copy of the printed digit appears after ~150 steps of 16
            "trainer.total_steps=5",
            "trainer.train_batch_size=8",
            "rollout.gen_batch_size=8",
            "trainer.save_every=5",
            "eval.max_tasks=8",
        ],
    )
    assert run_demo(cfg) == 0
    s = json.loads((cfg.run_dir() / "demo_summary.json").read_text())
    first, last = s["rollout_first_step"], s["rollout_last_step"]
    assert s["rollout_steps"] == [1, 5]
    assert last["rollout/acc_mean"] >= first["rollout/acc_mean"] + 0.1, s
    assert last["rollout/tool_images_mean"] < first["rollout/tool_images_mean"], s
    assert last["rollout/visual_tokens_mean"] < first["rollout/visual_tokens_mean"], s
    assert s["uniform_1fps_visual_tokens_mean"] >= 5 * last["rollout/visual_tokens_mean"], s
    assert last["rollout/tool_calls_mean"] >= 0.8, s
