"""Task loading (both formats, bad rows), synthetic tasks (answers checked from the pixels), video IO, make-data."""

from __future__ import annotations

import contextlib
import io
import json
from collections import deque
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pyvision_rl.data import DataError, load_tasks
from pyvision_rl.data.synthetic import expert_code, expert_turns, make_dataset, tokenizer_corpus
from pyvision_rl.data.video import VideoReader, probe_video, write_video

# The palette, written out again here so the checks do not read the generator's own tables.
PALETTE = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 255),
    "orange": (255, 128, 0),
}


def _png(path: Path, size=(32, 24), color=(10, 20, 30)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory) -> tuple[Path, Path]:
    return make_dataset(tmp_path_factory.mktemp("mixed"), "mixed", n_train=36, n_eval=6, seed=7)


# ------------------------------------------------------------------------------------------------ loading


def test_plain_jsonl_json_and_parquet(tmp_path):
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "a.png", (40, 30))
    frames = np.zeros((6, 32, 48, 3), dtype=np.uint8)
    write_video(tmp_path / "v.mp4", frames, fps=4)
    rows = [
        {"id": "a", "question": "What?", "answer": "1", "image_path": "img/a.png", "data_source": "count"},
        {"question": "Two?", "answer": 2, "image_path": ["img/a.png", str(tmp_path / "img" / "a.png")]},
        {"id": "v", "question": "When?", "answer": "3", "video_path": "v.mp4", "extra": {"k": 1}},
    ]
    jsonl = _write_jsonl(tmp_path / "t.jsonl", rows)
    js = tmp_path / "t.json"
    js.write_text(json.dumps(rows))
    pq_path = tmp_path / "t.parquet"
    # Parquet: one schema for all rows, so missing cells come back as None (optional fields)
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "id": "a",
                    "question": "What?",
                    "answer": "1",
                    "image_path": "img/a.png",
                    "data_source": "count",
                },
                {"id": "p2", "question": "Q", "answer": "4", "image_path": "img/a.png", "data_source": None},
            ]
        ),
        pq_path,
    )
    for path in (jsonl, js):
        tasks = load_tasks(path)
        assert [t.answer for t in tasks] == ["1", "2", "3"]
        assert tasks[0].id == "a" and tasks[0].data_source == "count"
        assert tasks[0].images == [str(tmp_path / "img" / "a.png")]  # relative to the data file
        assert tasks[0].extra["image_sizes"] == [[40, 30]]
        assert len(tasks[1].images) == 2 and tasks[1].data_source == "default"
        assert tasks[2].videos == [str(tmp_path / "v.mp4")] and tasks[2].extra["k"] == 1
        assert tasks[2].extra["video_info"][0]["n_frames"] == 6
    tasks = load_tasks(pq_path)
    assert [(t.id, t.answer, Path(t.images[0]).name) for t in tasks] == [
        ("a", "1", "a.png"),
        ("p2", "4", "a.png"),
    ]


def test_pyvision_rows_with_mm_hint_and_embedded_images(tmp_path):
    _png(tmp_path / "a.png", (50, 20))
    write_video(tmp_path / "v.mp4", np.zeros((4, 16, 16, 3), np.uint8), fps=2)
    buf = io.BytesIO()
    Image.new("RGB", (12, 8), (1, 2, 3)).save(buf, format="PNG")
    prompt = [{"role": "user", "content": "<image>\nQuestion about the image: What colour?"}]
    rows = [
        {
            "prompt": prompt,
            "data_source": "vstar",
            "ability": "vqa",
            "env_name": "pyvision_gym",
            "reward_model": {"ground_truth": "B", "style": "model"},
            "extra_info": {"question": "What colour?", "index": 11, "split": "train"},
            "images": {"bytes": buf.getvalue(), "path": None},
        },
        {
            "prompt": [{"role": "user", "content": "Q2 text"}],
            "data_source": "vsi",
            "reward_model": {"ground_truth": 3.5},
            "extra_info": {"question": "How far?", "index": 12},
            "env_name": "pyvision_gym_wo_video_hint",
            "mm_hint": {"hint_path": "v.mp4", "hint_type": "video"},
        },
        {
            "prompt": prompt,
            "data_source": "vstar",
            "reward_model": {"ground_truth": "A"},
            "extra_info": {"index": 13},
            "mm_hint": {"hint_path": "a.png", "hint_type": "image"},
        },
    ]
    path = tmp_path / "rl.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:1]), path)
    (t0,) = load_tasks(path)
    assert (t0.id, t0.question, t0.answer, t0.data_source) == ("vstar-11", "What colour?", "B", "vstar")
    assert t0.extra["env_name"] == "pyvision_gym" and "What colour?" in t0.extra["prompt"]
    assert Image.open(t0.images[0]).size == (12, 8)  # embedded bytes were written out to a file

    js = tmp_path / "rl.json"
    js.write_text(json.dumps(rows[1:]))
    t1, t2 = load_tasks(js)
    assert t1.answer == "3.5" and t1.videos == [str(tmp_path / "v.mp4")] and not t1.images
    assert t1.extra["video_info"][0] == {"width": 16, "height": 16, "n_frames": 4, "fps": 2.0}
    # no extra_info.question: the prompt text stands in, without the image marker
    assert t2.question == "Question about the image: What colour?" and t2.images == [str(tmp_path / "a.png")]


BAD_ROWS = [
    ({"answer": "1", "image_path": "ok.png"}, "question", "missing"),
    ({"question": "q", "image_path": "ok.png"}, "answer", "missing"),
    ({"question": ["q"], "answer": "1"}, "question", "expected a string"),
    ({"question": "q", "answer": {"x": 1}}, "answer", "expected a string"),
    ({"question": "q", "answer": "1", "image_path": 5}, "image_path", "expected a path"),
    ({"question": "q", "answer": "1", "image_path": "nope.png"}, "image_path", "image file not found"),
    ({"question": "q", "answer": "1", "image_path": "broken.png"}, "image_path", "unreadable image"),
    ({"question": "q", "answer": "1", "video_path": "nope.mp4"}, "video_path", "video file not found"),
    ({"question": "q", "answer": "1", "video_path": "broken.mp4"}, "video_path", "unreadable video"),
    ({"prompt": [], "extra_info": {"question": "q"}}, "reward_model", "missing"),
    (
        {"prompt": [], "reward_model": {}, "extra_info": {"question": "q"}},
        "reward_model.ground_truth",
        "missing",
    ),
    (
        {
            "reward_model": {"ground_truth": "1"},
            "extra_info": {"question": "q"},
            "mm_hint": {"hint_path": "ok.png", "hint_type": "audio"},
        },
        "mm_hint.hint_type",
        "expected 'image'",
    ),
    ("[1, 2]", None, "expected an object"),
    ("{not json", None, "invalid JSON"),
]


@pytest.mark.parametrize("row,field,problem", BAD_ROWS)
def test_bad_row_names_file_row_and_field(tmp_path, row, field, problem):
    _png(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage" * 4)
    good = {"question": "fine", "answer": "0", "image_path": "ok.png"}
    path = _write_jsonl(tmp_path / "d.jsonl", [good, good | {"id": "x2"}, row])
    with pytest.raises(DataError) as ei:
        load_tasks(path)
    msg = str(ei.value)
    assert str(path) in msg and "row 3" in msg and problem in msg
    assert ei.value.row == 3 and ei.value.field == field
    if field:
        assert f"field '{field}'" in msg


def test_skip_bad_counts(tmp_path):
    _png(tmp_path / "ok.png")
    rows = [{"id": f"r{i}", "question": "q", "answer": str(i), "image_path": "ok.png"} for i in range(4)]
    rows[1].pop("answer")
    rows[3]["image_path"] = "gone.png"
    rows.append({"id": "r0", "question": "dup", "answer": "1"})
    path = _write_jsonl(tmp_path / "d.jsonl", rows + ["", "oops"])  # a blank line is not a row
    stats: dict = {}
    tasks = load_tasks(path, skip_bad=True, stats=stats)
    assert [t.id for t in tasks] == ["r0", "r2"]
    assert stats["loaded"] == 2 and stats["skipped"] == 4
    assert stats["reasons"] == {"answer": 1, "image_path": 1, "id": 1, "row": 1}
    assert any("row 7" in e and "invalid JSON" in e for e in stats["errors"])
    with pytest.raises(DataError, match="not found"):
        load_tasks(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------------ video


def test_write_video_is_frame_accurate(tmp_path):
    rng = np.random.default_rng(0)
    frames = np.zeros((20, 48, 64, 3), dtype=np.uint8)
    for i in range(20):
        frames[i, :, :] = (i * 12, 255 - i * 12, 128)  # a distinct flat colour per frame
        frames[i, 8:24, 8:24] = rng.integers(0, 255, 3)
    path = write_video(tmp_path / "v.mp4", frames, fps=8)
    info = probe_video(path)
    assert (info.width, info.height, info.n_frames) == (64, 48, 20) and info.fps == pytest.approx(8.0)
    with av.open(str(path)) as c:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert decoded.shape == frames.shape
    # lossy, but each decoded frame is nearest to its own source frame
    err = np.abs(decoded.astype(int) - frames.astype(int)).mean(axis=(1, 2, 3))
    assert err.max() < 4
    reader = VideoReader(path)
    assert len(reader) == 20 and reader.get_batch([0, 19]).asnumpy().shape == (2, 48, 64, 3)


# ------------------------------------------------------------------------------------------------ synthetic


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean mask (plain BFS)."""
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        comp, q = [], deque([(y, x)])
        seen[y, x] = True
        while q:
            cy, cx = q.popleft()
            comp.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    q.append((ny, nx))
        comps.append(comp)
    return comps


def _independent_answer(task) -> str:
    """The answer recomputed from the rendered media, without the generator's code or records."""
    color = next(c for c in PALETTE if f" {c} " in f" {task.question} ")
    if task.videos:
        with av.open(task.videos[0]) as c:
            fps = float(c.streams.video[0].average_rate)
            frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(int)
        ch = {"red": 0, "green": 1, "blue": 2}[color]
        others = [k for k in range(3) if k != ch]
        hit = (frames[..., ch] > 180) & (frames[..., others[0]] < 80) & (frames[..., others[1]] < 80)
        first = int(np.flatnonzero(hit.sum((1, 2)) > 50)[0])
        return str(int(first // fps // 10) if "10-second" in task.question else first)
    px = np.asarray(Image.open(task.images[0]).convert("RGB"))
    mask = (px == PALETTE[color]).all(-1)
    comps = _components(mask)
    if "quadrant" in task.question:
        assert len(comps) == 1
        ys, xs = np.nonzero(mask)
        return (
            ("top" if ys.mean() < px.shape[0] / 2 else "bottom")
            + "-"
            + ("left" if xs.mean() < px.shape[1] / 2 else "right")
        )
    return str(len(comps))


class _CountingReader(VideoReader):
    """The host reader, counting the frames the code decodes (`[i]` and `get_batch`)."""

    reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)

    def get_batch(self, indices):
        indices = list(indices)
        self.reads += len(indices)
        return super().get_batch(indices)


def _run_expert(task, code: str | None = None, n_figures: int = 1) -> tuple[str, int]:
    """Execute the expert code (or `code`) the way the sandbox does: Agg matplotlib, plt.show() captures
    a PNG; checks it shows `n_figures` small figures. Returns (last printed line, frames decoded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown: list[bytes] = []

    def show(*_a, **_k):
        buf = io.BytesIO()
        plt.gcf().savefig(buf, format="png")
        plt.close("all")
        shown.append(buf.getvalue())

    env = {"plt": plt, "np": np, "Image": Image}
    if task.images:
        env["image_clue_0"] = Image.open(task.images[0])
    if task.videos:
        env["video_clue_0"] = _CountingReader(task.videos[0])
    out = io.StringIO()
    orig_show, plt.show = plt.show, show
    try:
        with contextlib.redirect_stdout(out):
            exec(code or expert_code(task), env)  # noqa: S102 - the expert's code, as the sandbox runs it
    finally:
        plt.show = orig_show
    assert len(shown) == n_figures
    assert all(Image.open(io.BytesIO(b)).size == (112, 112) for b in shown)  # small: 16 vision tokens
    return out.getvalue().strip().splitlines()[-1], getattr(env.get("video_clue_0"), "reads", 0)


def test_synthetic_answers_are_right_and_expert_solves_them(mixed_dataset):
    train, held_out = mixed_dataset
    tasks = load_tasks(train) + load_tasks(held_out)
    kinds = {t.extra["kind"] for t in tasks}
    assert kinds == {"color_count", "small_objects", "video_event"}
    assert {t.data_source for t in tasks} >= {"synthetic_count", "synthetic_video_frame"}
    for t in tasks:
        assert _independent_answer(t) == t.answer, t.id
        printed, _ = _run_expert(t)
        assert printed == t.answer, (t.id, expert_code(t))


def test_video_moment_needs_seeking(tmp_path):
    """Long clips whose answer (the 10-second part in which the asked-for square appears) is checked from
    the decoded frames; 1 fps would fill the tiny model's context; the expert's binary search decodes
    ~log2(n) frames and shows one, the naive strategy shows 4 uniformly sampled frames and is mostly wrong."""
    from pyvision_rl.data.synthetic import NAIVE_FRAMES, naive_answer
    from pyvision_rl.models.processing import image_token_count

    train, held_out = make_dataset(tmp_path, "video_moment", n_train=10, n_eval=2, seed=3)
    tasks = load_tasks(train) + load_tasks(held_out)
    naive_right = 0
    for t in tasks:
        info = probe_video(t.videos[0])
        assert (info.width, info.height, info.fps) == (112, 112, 2.0) and 128 <= info.n_frames <= 180
        assert info.n_frames // 2 * image_token_count((1, 8, 8), 2) >= 1024  # 1 fps fills the context
        assert t.question.startswith("In which 10-second part") and _independent_answer(t) == t.answer, t.id
        printed, reads = _run_expert(t)
        assert printed == f"{t.answer} (10-second part)" and reads <= 9, (t.id, printed, reads)
        seek, naive = expert_turns(t, use_tool=True), expert_turns(t, use_tool=False)
        assert "video_clue_0" in seek[0] and "get_batch" not in seek[0] and "get_batch" in naive[0]
        code = naive[0].removeprefix("<code>\n```python\n").removesuffix("\n```\n</code>")
        printed, _ = _run_expert(t, code, n_figures=NAIVE_FRAMES)
        digit = printed.split()[0]
        assert naive[1] == f"<answer>\n\\boxed{{{digit}}}\n</answer>" and digit == naive_answer(t)
        naive_right += digit == t.answer
    assert naive_right <= len(tasks) // 2


def test_color_count_task_shape_and_balance(tmp_path):
    train, _ = make_dataset(tmp_path, "color_count", n_train=120, n_eval=2, seed=3)
    tasks = load_tasks(train)
    answers = [int(t.answer) for t in tasks]
    assert set(answers) == set(range(10))  # every count appears
    assert len({t.question for t in tasks}) == 6  # every colour is asked about
    for t in tasks[:5]:
        assert Image.open(t.images[0]).size == (112, 112)
        assert t.question.startswith("How many ") and t.data_source == "synthetic_count"


def test_expert_code_reads_the_colour_from_the_question(mixed_dataset):
    (task,) = [t for t in load_tasks(mixed_dataset[0]) if t.extra["kind"] == "color_count"][:1]
    for color, rgb in PALETTE.items():
        t2 = type(task)(task.id, f"How many {color} squares are there?", "?", images=task.images)
        assert str(rgb) in expert_code(t2)
        t2.answer = _independent_answer(t2)
        assert _run_expert(t2)[0] == t2.answer


def test_expert_turns_protocol_strings(mixed_dataset):
    task = load_tasks(mixed_dataset[0])[0]
    code_turn, answer_turn = expert_turns(task, use_tool=True)
    assert code_turn.startswith("<code>\n```python\n") and code_turn.endswith("\n```\n</code>")
    assert answer_turn == f"<answer>\n\\boxed{{{task.answer}}}\n</answer>"
    assert expert_turns(task, use_tool=False) == [answer_turn]
    corpus = tokenizer_corpus()
    assert corpus == tokenizer_corpus() and code_turn.split("\n")[3] in "\n".join(corpus)


def test_make_dataset_is_deterministic(tmp_path):
    a_train, _ = make_dataset(tmp_path / "a", "mixed", 6, 2, seed=5)
    b_train, _ = make_dataset(tmp_path / "b", "mixed", 6, 2, seed=5)
    assert a_train.read_text() == b_train.read_text()
    for rel in ("images/train_00000.png", "videos/train_00002.mp4"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    c_train, _ = make_dataset(tmp_path / "c", "mixed", 6, 2, seed=6)
    assert c_train.read_text() != a_train.read_text()


def test_make_data_cli(tmp_path, capsys):
    from pyvision_rl.cli import main

    rc = main(
        ["make-data", "--out", str(tmp_path), "--kind", "small_objects", "--n-train", "5", "--n-eval", "2"]
    )
    assert rc == 0 and "5 training tasks" in capsys.readouterr().out
    tasks = load_tasks(tmp_path / "train.jsonl")
    assert len(tasks) == 5 and all(Image.open(t.images[0]).size == (448, 448) for t in tasks)
    assert len(load_tasks(tmp_path / "eval.jsonl")) == 2


def test_make_data_cli_offers_every_synthetic_kind():
    """The CLI lists its kinds by hand (so --help stays import-light): it must not drift from the generator."""
    import argparse

    from pyvision_rl.data.cli import register
    from pyvision_rl.data.synthetic import KINDS

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    kind = next(a for a in sub.choices["make-data"]._actions if a.dest == "kind")
    assert set(kind.choices) == {*KINDS, "mixed"}
