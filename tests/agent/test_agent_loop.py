"""AgentLoop with a ScriptedEngine (the policy's quality is not under test), the tiny model's processor and
the real process sandbox (bwrap kernels); the end-reason decisions as tables."""

from __future__ import annotations

import asyncio

import pytest

from pyvision_rl.agent.loop import (
    AgentLoop,
    LocalSandboxClient,
    LoopSettings,
    after_execution,
    after_model_turn,
)
from pyvision_rl.agent.protocol import FORMAT_ERROR_MESSAGE, ChatTokens
from pyvision_rl.agent.scripted import ScriptedEngine
from pyvision_rl.config import RolloutConfig, SandboxConfig
from pyvision_rl.types import EndReason, ExecResult, Task

SHOW = (
    "plt.figure(figsize=(0.56, 0.56), dpi=100)\nplt.imshow(np.zeros((8, 8)))\nplt.axis('off')\nplt.show()\n"
)


def code(src: str) -> str:
    return f"Let me check.\n<code>\n```python\n{src}\n```\n</code>"


def answer(a: str) -> str:
    return f"<answer>\n\\boxed{{{a}}}\n</answer>"


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from pyvision_rl.models import load_processor

    return load_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def sandbox():
    from pyvision_rl.sandbox import make_sandbox
    from pyvision_rl.sandbox.base import SandboxError

    try:
        sb = make_sandbox(SandboxConfig(backend="process", warm_kernels=4, timeout_s=10))
    except SandboxError as e:
        pytest.skip(f"process sandbox unavailable: {e}")
    yield sb
    sb.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pyvision_rl.data import load_tasks
    from pyvision_rl.data.synthetic import make_dataset

    out = tmp_path_factory.mktemp("synthetic")
    train, _ = make_dataset(out, "mixed", 3, 0, seed=0)
    tasks = load_tasks(train)
    return {t.extra["kind"]: t for t in tasks}


def run(processor, sandbox, scripts: dict[str, list[str]], tasks: list[Task], n: int = 1, client=None, **cfg):
    engine = ScriptedEngine.from_turns(processor.tokenizer, scripts, logprob=-0.5)
    client = client or LocalSandboxClient(sandbox)
    settings = dict(prompt_template="tiny_tool", max_total_len=4096, exec_timeout_s=8.0)
    settings.update(cfg)
    loop = AgentLoop(engine, client, processor, RolloutConfig(), **settings)
    try:
        trajs = loop.run([(t, f"g-{t.id}") for t in tasks for _ in range(n)], version=7)
    finally:
        loop.close()
    assert client._kernels == {}, "every kernel is closed after the run"
    return trajs, engine, loop


def check_invariants(t, processor):
    """Token-in-token-out bookkeeping every trajectory must satisfy."""
    assert len(t.response_ids) == len(t.loss_mask) == len(t.rollout_logprobs)
    assert t.vision_ok
    assert all(lp == 0.0 for lp, m in zip(t.rollout_logprobs, t.loss_mask, strict=True) if m == 0)
    assert all(lp == -0.5 for lp, m in zip(t.rollout_logprobs, t.loss_mask, strict=True) if m == 1)
    ct = ChatTokens(processor.tokenizer)
    full = t.prompt_ids + t.response_ids
    assert t.visual_tokens == ct.count_image_tokens(full)
    # model tokens never include a vision token
    assert not any(tok in ct.vision_ids for tok, m in zip(t.response_ids, t.loss_mask, strict=True) if m == 1)


def test_multi_turn_with_images_through_the_real_sandbox(processor, sandbox, data):
    task = data["color_count"]
    scripts = {
        task.id: [
            code("import numpy as np\nx = 41\n" + SHOW + "print('first')"),
            code("import numpy as np\nx += 1\n" + SHOW + SHOW + "print(x)"),
            answer("42"),
        ]
    }
    trajs, engine, loop = run(processor, sandbox, scripts, [task], n=2)
    assert len(engine.calls) == 6, "one request per turn per trajectory"
    for t in trajs:
        check_invariants(t, processor)
        assert t.end_reason == EndReason.DONE and t.final_answer == "42"
        assert (t.n_turns, t.n_tool_calls, t.n_tool_attempts, t.n_tool_images) == (3, 2, 2, 3)
        assert [r.source for r in t.images] == ["input", "tool", "tool", "tool"]
        assert t.version == 7 and t.group_id == f"g-{task.id}"
        # state persisted across turns (x += 1) and figures are numbered after the input image
        assert "Text Result:\n42\nImage Result:\n<image_clue_2>" in t.response_text
        assert "<image_clue_3>" in t.response_text and "<image_clue_1>" in t.response_text
        assert t.response_text.endswith("\\boxed{42}\n</answer><|im_end|>")
        # the observation after the first figure starts exactly as the release renders it
        assert (
            "</code>\n<|im_start|>user\n<tool_response>\n<interpreter>Text Result:\nfirst\n"
            in t.response_text
        )
        assert (
            sum(t.loss_mask)
            == sum(
                len(engine._encode(s))
                for s in [scripts[task.id][0], scripts[task.id][1], scripts[task.id][2]]
            )
            + 1
        )  # + <|im_end|>
    assert loop.last_stats["turns"] == 6 and loop.last_stats["sandbox_s"] > 0
    assert trajs[0].extra["question"] == task.question and trajs[0].extra["kind"] == "image"
    assert all(trajs[0].extra[k] == v for k, v in task.extra.items() if k != "kind"), "Task.extra is copied"


@pytest.mark.parametrize("feed_errors", [False, True])
def test_python_errors_with_and_without_feed_errors(processor, sandbox, data, feed_errors):
    task = data["color_count"]
    scripts = {task.id: [code("print(1 / 0)"), code("print('recovered')"), answer("1")]}
    (t,), _, _ = run(processor, sandbox, scripts, [task], feed_errors=feed_errors)
    check_invariants(t, processor)
    assert t.n_tool_attempts >= 1
    if not feed_errors:
        assert t.end_reason == EndReason.ERROR_IN_ACTION and t.n_tool_calls == 0 and t.n_turns == 1
        assert "<tool_response>" not in t.response_text
    else:
        assert t.end_reason == EndReason.DONE and t.n_tool_calls == 1 and t.n_tool_attempts == 2
        assert "<interpreter>Execution error: " in t.response_text and "ZeroDivisionError" in t.response_text
        assert "Text Result:\nrecovered</interpreter>" in t.response_text


def test_timeout_is_fed_back_and_the_next_cell_runs_in_a_fresh_interpreter(processor, sandbox, data):
    task = data["color_count"]
    scripts = {
        task.id: [
            code("import time\ny = 5\ntime.sleep(30)"),
            code("print('alive', 'y' in globals())"),
            answer("0"),
        ]
    }
    (t,), _, _ = run(processor, sandbox, scripts, [task], feed_errors=True, exec_timeout_s=1.0)
    check_invariants(t, processor)
    assert t.end_reason == EndReason.DONE
    assert "timed out" in t.response_text and "Text Result:\nalive False" in t.response_text
    assert t.timings["sandbox_s"] < 20


def test_timeout_without_feed_errors_ends_the_trajectory(processor, sandbox, data):
    task = data["color_count"]
    (t,), _, _ = run(
        processor, sandbox, {task.id: [code("while True: pass"), answer("0")]}, [task], exec_timeout_s=1.0
    )
    assert t.end_reason == EndReason.ERROR_IN_ACTION and t.n_tool_calls == 0 and t.n_tool_attempts == 1


def test_length_limit_hit_right_before_an_image_observation(processor, sandbox, data):
    task = data["color_count"]
    turns = [code("import numpy as np\n" + SHOW + "print('fig')"), answer("1")]
    (full,), _, _ = run(processor, sandbox, {task.id: turns}, [task])
    assert full.end_reason == EndReason.DONE and full.n_tool_images == 1
    model_turn = full.loss_mask.index(0)  # first observation token
    obs_len = full.loss_mask[model_turn:].index(1)
    before = len(full.prompt_ids) + model_turn
    # One token short of fitting the image observation: it must not be appended at all.
    (t,), _, _ = run(processor, sandbox, {task.id: turns}, [task], max_total_len=before + obs_len - 1)
    check_invariants(t, processor)
    assert t.end_reason == EndReason.OVER_LENGTH
    assert len(t.response_ids) == model_turn and t.n_tool_images == 0 and len(t.images) == 1
    assert t.visual_tokens == ChatTokens(processor.tokenizer).count_image_tokens(full.prompt_ids)
    assert full.visual_tokens > t.visual_tokens
    # Exactly fitting: appended, then no room for another turn.
    (t2,), _, _ = run(processor, sandbox, {task.id: turns}, [task], max_total_len=before + obs_len)
    check_invariants(t2, processor)
    assert t2.n_tool_images == 1 and t2.end_reason == EndReason.OVER_LENGTH and t2.length == before + obs_len


def test_turn_cut_by_the_length_budget_is_over_length(processor, sandbox, data):
    task = data["color_count"]
    (probe,), _, _ = run(processor, sandbox, {task.id: [answer("1")]}, [task])
    limit = len(probe.prompt_ids) + 30
    (t,), _, _ = run(processor, sandbox, {task.id: [answer("1" * 400)]}, [task], max_total_len=limit)
    assert t.end_reason == EndReason.OVER_LENGTH and t.length == limit
    # the same cut by max_new_tokens (not by the total budget) is a malformed action, as in the release
    (t2,), _, _ = run(processor, sandbox, {task.id: [answer("1" * 400)]}, [task], max_new_tokens=30)
    assert t2.end_reason == EndReason.ERROR_IN_ACTION and len(t2.response_ids) == 30


def test_too_many_images(processor, sandbox, data):
    task = data["color_count"]
    scripts = {
        task.id: [code("import numpy as np\n" + SHOW), code("import numpy as np\n" + SHOW * 2), answer("1")]
    }
    (t,), _, _ = run(processor, sandbox, scripts, [task], max_images=3)
    check_invariants(t, processor)
    assert t.end_reason == EndReason.EXCEED_MAX_IMAGES
    assert len(t.images) == 2 and t.n_tool_images == 1 and t.n_tool_calls == 2


def test_max_turns(processor, sandbox, data):
    task = data["color_count"]
    scripts = {task.id: [code("print(1)")] * 5}
    (t,), _, _ = run(processor, sandbox, scripts, [task], max_turns=2)
    check_invariants(t, processor)
    assert t.end_reason == EndReason.EXCEED_MAX_TURNS and t.n_turns == 2 and t.n_tool_attempts == 1


@pytest.mark.parametrize(
    "turn,feed,reason",
    [
        ("I think the answer is 3.", False, EndReason.ERROR_IN_ACTION),  # no code, no answer
        ("<answer>\n\\boxed{3}\n", False, EndReason.ERROR_IN_ACTION),  # unclosed answer
        ("<code>\n```python\n\n```\n</code>", False, EndReason.ERROR_IN_ACTION),  # empty code
        ("I think the answer is 3.", True, EndReason.DONE),  # fed back, then answered
    ],
)
def test_malformed_turns(processor, sandbox, data, turn, feed, reason):
    task = data["color_count"]
    (t,), _, _ = run(processor, sandbox, {task.id: [turn, answer("3")]}, [task], feed_errors=feed)
    check_invariants(t, processor)
    assert t.end_reason == reason and t.n_tool_attempts == 0
    if feed:
        assert f"<interpreter>Error: {FORMAT_ERROR_MESSAGE}</interpreter>" in t.response_text
        assert t.final_answer == "3"


def test_two_answers_take_the_last(processor, sandbox, data):
    task = data["color_count"]
    (t,), _, _ = run(processor, sandbox, {task.id: [answer("1") + "\n" + answer("{2}")]}, [task])
    assert t.end_reason == EndReason.DONE and t.final_answer == "{2}" and t.n_turns == 1


def test_model_generated_vision_tokens_are_removed(processor, sandbox, data):
    task = data["color_count"]
    bad = "look <|vision_start|><|image_pad|><|image_pad|><|vision_end|> here\n" + code("print(2)")
    (t,), _, _ = run(processor, sandbox, {task.id: [bad, answer("2")]}, [task])
    check_invariants(t, processor)
    assert t.end_reason == EndReason.DONE and t.extra["removed_vision_tokens"] == 4
    assert t.visual_tokens == ChatTokens(processor.tokenizer).count_image_tokens(t.prompt_ids)


def test_video_task_solved_by_sampling_frames(processor, sandbox, data):
    from pyvision_rl.data.synthetic import expert_turns

    task = data["video_event"]
    (t,), _, _ = run(processor, sandbox, {task.id: expert_turns(task, use_tool=True)}, [task])
    check_invariants(t, processor)
    ct = ChatTokens(processor.tokenizer)
    assert t.end_reason == EndReason.DONE and t.final_answer == task.answer
    assert ct.count_image_tokens(t.prompt_ids) == 0, "the video prompt shows no frame"
    assert "Video Length: " in ct.decode(t.prompt_ids) and t.extra["kind"] == "video"
    assert t.n_tool_images == 1 and t.visual_tokens == ct.count_image_tokens(t.response_ids) > 0
    assert "<image_clue_0><|vision_start|>" in t.response_text  # video trajectories number figures from 0


def test_a_sandbox_failure_or_bad_row_costs_one_trajectory(processor, sandbox, data):
    task = data["color_count"]

    class Flaky(LocalSandboxClient):
        async def execute(self, traj_id, code, timeout_s):
            if traj_id.endswith("#1"):
                raise ConnectionError("sandbox pool died")
            if traj_id.endswith("#2"):  # the sandbox layer reports its own failure
                return ExecResult(error="KernelDied: box vanished", sandbox_error=True)
            return await super().execute(traj_id, code, timeout_s)

    engine = ScriptedEngine.from_turns(
        processor.tokenizer, {task.id: [code("print(5)"), answer("5")], "missing": [answer("0")]}
    )
    client = Flaky(sandbox)
    missing = Task(id="missing", question="?", answer="0", images=["/nonexistent/x.png"])
    loop = AgentLoop(engine, client, processor, RolloutConfig(prompt_template="tiny_tool"))
    trajs = loop.run([(task, "g"), (task, "g"), (task, "g"), (missing, "h")])
    loop.close()
    assert [t.end_reason for t in trajs] == [
        EndReason.DONE,
        EndReason.SANDBOX_ERROR,  # never scored as the model's ERROR_IN_ACTION
        EndReason.SANDBOX_ERROR,
        EndReason.ERROR_IN_ACTION,
    ]
    assert "sandbox pool died" in trajs[1].extra["sandbox_error"]
    assert "KernelDied" in trajs[2].extra["sandbox_error"] and trajs[2].n_tool_calls == 0
    assert "prompt" in trajs[3].extra["error"] and not trajs[3].vision_ok
    assert client._kernels == {}


class CountingClient(LocalSandboxClient):
    """Records how many kernels were open at once and how many opens had to wait for a slot."""

    def __init__(self, sandbox, max_kernels):
        super().__init__(sandbox, max_kernels)
        self.peak = self.waited = 0

    async def open(self, traj_id, images, videos):
        self.waited += self._slot().locked()
        await super().open(traj_id, images, videos)
        self.peak = max(self.peak, len(self._kernels))


def test_more_live_trajectories_than_kernel_slots(processor, sandbox, data):
    """Six two-turn trajectories over two kernel slots: each waits for a kernel without blocking the others
    (no waves, no deadlock), never more than two kernels are open, and all finish."""
    task = data["color_count"]
    # each cell holds its kernel a while, so the trajectories really overlap and wait
    scripts = {task.id: [code("import time\ntime.sleep(0.3)\nx = 1\n" + SHOW + "print(x)"), answer("1")]}
    client = CountingClient(sandbox, max_kernels=2)
    trajs, engine, loop = run(processor, sandbox, scripts, [task], n=6, client=client)
    assert all(t.end_reason == EndReason.DONE and t.n_tool_calls == 1 for t in trajs)
    assert client.peak <= 2 and client.waited >= 4 and len({t.extra["request_id"] for t in trajs}) == 6
    assert loop.last_stats["trajectories"] == 6 and len(engine.calls) == 12


def test_each_trajectory_goes_on_when_its_own_cell_returns(processor, sandbox, data):
    """A slow cell in one trajectory does not hold the others' next turns (the turn-synchronous loop made
    every trajectory wait for the slowest cell of each turn)."""
    task = data["color_count"]
    fast = [code("print(1)"), code("print(2)"), code("print(3)"), answer("3")]
    scripts = {f"{task.id}#slow": [code("import time\ntime.sleep(4)\nprint(0)"), answer("0")]}
    scripts[f"{task.id}#fast"] = fast
    engine = ScriptedEngine.from_turns(processor.tokenizer, scripts, delay_s=0.05)
    loop = AgentLoop(
        engine, LocalSandboxClient(sandbox), processor, RolloutConfig(), prompt_template="tiny_tool"
    )
    slow, quick = loop.run([(task, "slow"), (task, "fast")])
    assert slow.end_reason == quick.end_reason == EndReason.DONE and quick.n_tool_calls == 3
    # Order, not a time limit: every turn of the fast trajectory was asked for while the slow cell ran (a
    # turn-synchronous loop asks for the fast one's second turn only after the slow cell returns).
    rid = [c.split("#")[1] for c in engine.calls]
    assert rid.count("fast") == 4 and rid.count("slow") == 2 and rid[-1] == "slow", rid
    assert quick.timings["total_s"] < slow.timings["total_s"]


def test_run_async_inside_a_running_loop(processor, sandbox, data):
    task = data["color_count"]
    engine = ScriptedEngine.from_turns(processor.tokenizer, {task.id: [answer("1")]})
    loop = AgentLoop(
        engine, LocalSandboxClient(sandbox), processor, RolloutConfig(), prompt_template="tiny_tool"
    )

    async def main():
        groups = [g async for g in loop.stream_groups([(task, "a"), (task, "b"), (task, "a")])]
        return groups

    groups = asyncio.run(main())
    assert sorted([t.group_id for t in g] for g in groups) == [["a", "a"], ["b"]]
    assert [
        t.extra["request_id"].rsplit("#", 1)[1] for t in groups[[g[0].group_id for g in groups].index("a")]
    ] == [
        "0",
        "1",
    ]


S = LoopSettings(max_turns=3, max_total_len=100, max_images=4)
SF = LoopSettings(max_turns=3, max_total_len=100, max_images=4, feed_errors=True)


@pytest.mark.parametrize(
    "s,finish,action,n_turns,ctx,capped,expected",
    [
        (S, "length", "none", 1, 50, False, EndReason.ERROR_IN_ACTION),  # hit max_new_tokens
        (S, "length", "none", 1, 50, True, EndReason.OVER_LENGTH),  # cut by the total-length budget
        (S, "length", "none", 1, 100, False, EndReason.OVER_LENGTH),
        (S, "stop", "answer", 3, 100, False, EndReason.DONE),  # an answer wins over every limit
        (S, "eos", "answer", 1, 10, False, EndReason.DONE),
        (S, "stop", "code", 1, 100, False, EndReason.OVER_LENGTH),
        (S, "eos", "none", 1, 10, False, EndReason.ERROR_IN_ACTION),
        (SF, "eos", "none", 1, 10, False, "format_error"),
        (SF, "eos", "none", 3, 10, False, EndReason.EXCEED_MAX_TURNS),
        (S, "stop", "code", 3, 10, False, EndReason.EXCEED_MAX_TURNS),  # the max_turns-th code turn: not run
        (S, "stop", "code", 2, 10, False, "execute"),
    ],
)
def test_after_model_turn_table(s, finish, action, n_turns, ctx, capped, expected):
    assert after_model_turn(s, finish, action, n_turns, ctx, capped) == expected


PNG = b"png"


@pytest.mark.parametrize(
    "s,result,n_images,crashed,expected",
    [
        (S, None, 1, True, EndReason.SANDBOX_ERROR),
        (S, ExecResult(error="KernelTimeout", sandbox_error=True), 1, False, EndReason.SANDBOX_ERROR),
        (SF, ExecResult(error="box died", sandbox_error=True), 1, False, EndReason.SANDBOX_ERROR),
        (S, ExecResult(error="ZeroDivisionError"), 1, False, EndReason.ERROR_IN_ACTION),
        (S, ExecResult(timed_out=True), 1, False, EndReason.ERROR_IN_ACTION),
        (SF, ExecResult(error="ZeroDivisionError"), 1, False, "feed_error"),
        (SF, ExecResult(timed_out=True), 1, False, "feed_error"),
        (S, ExecResult(stdout="1"), 1, False, "observe"),
        (S, ExecResult(images=[PNG] * 3), 1, False, "observe"),
        (S, ExecResult(images=[PNG] * 4), 1, False, EndReason.EXCEED_MAX_IMAGES),
    ],
)
def test_after_execution_table(s, result, n_images, crashed, expected):
    assert after_execution(s, result, n_images, crashed) == expected


def test_twin_rollouts_of_one_request_keep_their_own_kernels(processor, sandbox, data):
    """A re-submitted chunk repeats its request ids while its cancelled twin may still be running on the same
    sandbox client: the two must not share (or close) one kernel. Both twins run their cells to the end."""
    import asyncio

    task = data["color_count"]
    scripts = {task.id: [code("import time\ntime.sleep(0.3)\nx = 1\n" + SHOW + "print(x)"), answer("1")]}
    client = LocalSandboxClient(sandbox)
    settings = dict(prompt_template="tiny_tool", max_total_len=4096, exec_timeout_s=8.0)
    loops = [
        AgentLoop(
            ScriptedEngine.from_turns(processor.tokenizer, scripts, logprob=-0.5),
            client,
            processor,
            RolloutConfig(),
            **settings,
        )
        for _ in range(2)
    ]

    async def twins():
        return await asyncio.gather(*(lp.run_async([(task, "g-twin")], 1, seed=3) for lp in loops))

    try:
        (a,), (b,) = asyncio.run(twins())
    finally:
        for lp in loops:
            lp.close()
    assert a.extra["request_id"] == b.extra["request_id"]
    assert [t.end_reason for t in (a, b)] == [EndReason.DONE, EndReason.DONE]
    assert a.n_tool_calls == b.n_tool_calls == 1
    assert client._kernels == {}


def test_prompt_uses_what_the_loader_read_and_equals_a_fresh_read(processor, sandbox, data):
    """The loader records image sizes and video probes (Task.extra); the loop builds the prompt from them
    instead of opening the files again, and the prompt is the one a fresh read gives."""
    from dataclasses import replace as dc_replace

    engine = ScriptedEngine.from_turns(processor.tokenizer, {}, logprob=-0.5)
    loop = AgentLoop(
        engine, LocalSandboxClient(sandbox), processor, RolloutConfig(prompt_template="tiny_tool")
    )
    video = next(t for t in data.values() if t.videos)
    image = next(t for t in data.values() if t.images)
    assert video.extra["video_info"] and image.extra["image_sizes"]
    for task in (video, image):
        bare = dc_replace(
            task, extra={k: v for k, v in task.extra.items() if k not in ("video_info", "image_sizes")}
        )
        assert loop.build_prompt(task)[0] == loop.build_prompt(bare)[0]
    # the recorded probe is what the prompt states (a stale record would show here, not a re-read)
    info = dict(video.extra["video_info"][0], n_frames=12345)
    ids = loop.build_prompt(dc_replace(video, extra=dict(video.extra, video_info=[info])))[0]
    assert "12345" in ChatTokens(processor.tokenizer).decode(ids)
