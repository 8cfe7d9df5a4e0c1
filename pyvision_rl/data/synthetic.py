"""Synthetic tasks with ground truth, deterministic from a seed: the demo task and test fixtures.

Three kinds, each with a scripted expert (`expert_code`, `expert_turns`) whose code runs in the sandbox:
- `color_count`: a 112x112 image, an 8x8 grid of 14-px cells with squares in 6 named colours; the
  question names a colour, the answer (0-9) is how many squares have it (PLATFORM.md, "A tiny model that
  really learns"). The expert code must turn the colour *name* into RGB, so a model has to read the question.
- `small_objects`: a 448x448 canvas with a few 6x6 objects; count one colour, or say which quadrant the
  single object of a colour is in. The objects are ~1 % of the width: looking closer (cropping) helps.
- `video_event`: a short mp4 where a coloured square appears at a given frame; the answer is that frame index.
- `video_moment`: PyVision-Video in miniature. A 64-90 s clip (2 fps, 112x112) in which a coloured square
  appears at one moment and stays (a square of another colour appears at another moment); the question
  asks in which 10-second part of the clip (one digit, 0-8). Showing the clip at 1 fps would cost 64-90 frames x 16 visual tokens, more than
  the tiny model's whole context, so an agent must seek: the expert binary-searches with
  `video_clue_0[i]` (~7 frames decoded, ONE shown); the naive strategy (`expert_turns(..., use_tool=False)`)
  samples 4 frames uniformly with `get_batch`, shows all 4 and answers from them, which is rarely right.

Colours are exact RGB values in lossless PNGs, so code can match them with `==`; video is lossy, so video
code thresholds channels instead.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
from PIL import Image

from pyvision_rl.types import Task

# Exact RGB per colour name; the expert code embeds these literals (the model learns the mapping).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 255),
    "orange": (255, 128, 0),
}
# Colours that survive lossy video coding and are told apart by channel thresholds.
VIDEO_COLORS = ("red", "green", "blue")
VIDEO_CHANNEL = {"red": 0, "green": 1, "blue": 2}  # the channel each video colour saturates
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")

KINDS = ("color_count", "small_objects", "video_event", "video_moment")
MIXED_KINDS = ("color_count", "small_objects", "video_event")  # `mixed`: the quick kinds (test fixtures)
CELL = 14  # px per cell in color_count (one Qwen patch)
GRID = 8  # cells per side in color_count
OBJ = 6  # px per side of a small object
CANVAS = 448  # px per side of the small_objects canvas
VIDEO_SIZE = 64
VIDEO_FPS = 8
VIDEO_SQUARE = 16
MOMENT_SIZE = 112  # one frame = 16 visual tokens, as one shown figure
MOMENT_FPS = 2
MOMENT_SECONDS = (64, 90)  # clip length: at 1 fps, 1024-1440 visual tokens (the whole context)
MOMENT_SQUARE = 24
NAIVE_FRAMES = 4  # frames the naive strategy samples uniformly and shows

COUNT_QUESTION = "How many {color} squares are there?"
OBJECTS_COUNT_QUESTION = "How many {color} dots are there?"
OBJECTS_LOCATE_QUESTION = (
    "In which quadrant is the {color} dot? Answer top-left, top-right, bottom-left or bottom-right."
)
VIDEO_QUESTION = "At which frame index does the {color} square first appear?"
MOMENT_UNIT = " (10-second part)"  # printed after the digit: a digit before a newline is another token
MOMENT_QUESTION = (
    "In which 10-second part of the video does the {color} square first appear "
    "(0 for 0-9 s, 1 for 10-19 s, ...)?"
)

# Figures the expert shows: small, so one tool image costs few vision tokens (112 px -> 16 tokens).
_SHOW = "plt.figure(figsize=(1.12, 1.12), dpi=100)\nplt.imshow({arr})\nplt.axis('off')\nplt.show()\n"


# --------------------------------------------------------------------------------------------------
# Rendering


def render_color_count(rng: random.Random, color: str, count: int) -> Image.Image:
    """An 8x8 grid image with exactly `count` squares of `color` and random counts of the others."""
    cells = list(range(GRID * GRID))
    rng.shuffle(cells)
    others = [c for c in COLORS if c != color]
    placement: list[str] = [color] * count
    for other in others:
        placement += [other] * rng.randint(0, 9)
    canvas = np.zeros((GRID * CELL, GRID * CELL, 3), dtype=np.uint8)  # black background
    for cell, name in zip(cells, placement, strict=False):
        r, c = divmod(cell, GRID)
        # 1-px black margin keeps squares visually separate; the cell centre is always filled.
        canvas[r * CELL + 1 : (r + 1) * CELL - 1, c * CELL + 1 : (c + 1) * CELL - 1] = COLORS[name]
    return Image.fromarray(canvas, "RGB")


def _place_objects(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """`n` top-left corners of non-touching OBJ-px objects on the canvas (a coarse jittered grid)."""
    slots = [(r, c) for r in range(CANVAS // 32) for c in range(CANVAS // 32)]
    rng.shuffle(slots)
    return [
        (r * 32 + rng.randint(2, 32 - OBJ - 2), c * 32 + rng.randint(2, 32 - OBJ - 2)) for r, c in slots[:n]
    ]


def render_small_objects(rng: random.Random, objects: list[str]) -> Image.Image:
    """A light-grey canvas with one OBJ x OBJ square per entry of `objects` (colour names)."""
    canvas = np.full((CANVAS, CANVAS, 3), 235, dtype=np.uint8)
    for (y, x), name in zip(_place_objects(rng, len(objects)), objects, strict=True):
        canvas[y : y + OBJ, x : x + OBJ] = COLORS[name]
    return Image.fromarray(canvas, "RGB")


def render_video_event(
    rng: random.Random,
    n_frames: int,
    color: str,
    first: int,
    distractor: str,
    distractor_first: int,
    size: int = VIDEO_SIZE,
    square: int = VIDEO_SQUARE,
) -> np.ndarray:
    """(T, H, W, 3) frames: dark background; `color` square from frame `first` on, a distractor square
    of another colour from `distractor_first` on (elsewhere on the frame)."""
    frames = np.full((n_frames, size, size, 3), 20, dtype=np.uint8)
    half = size // 2
    # target in the left half, distractor in the right half: they never overlap
    ty, tx = rng.randint(0, size - square), rng.randint(0, half - square)
    dy, dx = rng.randint(0, size - square), rng.randint(half, size - square)
    frames[first:, ty : ty + square, tx : tx + square] = COLORS[color]
    frames[distractor_first:, dy : dy + square, dx : dx + square] = COLORS[distractor]
    return frames


# --------------------------------------------------------------------------------------------------
# Task generation


def _make_color_count(rng: random.Random, idx: int, out_dir: Path, split: str) -> dict:
    color = rng.choice(list(COLORS))
    count = rng.randint(0, 9)  # uniform answers: guessing the majority class does not pay
    img = render_color_count(rng, color, count)
    rel = f"images/{split}_{idx:05d}.png"
    img.save(out_dir / rel)
    return {
        "id": f"color_count-{split}-{idx}",
        "question": COUNT_QUESTION.format(color=color),
        "answer": str(count),
        "image_path": rel,
        "data_source": "synthetic_count",
        "extra": {"kind": "color_count", "color": color},
    }


def _make_small_objects(rng: random.Random, idx: int, out_dir: Path, split: str) -> dict:
    color = rng.choice(list(COLORS))
    others = [c for c in COLORS if c != color]
    if rng.random() < 0.5:
        count = rng.randint(0, 6)
        objects = [color] * count + [rng.choice(others) for _ in range(rng.randint(2, 8))]
        question, answer, source, mode = (
            OBJECTS_COUNT_QUESTION.format(color=color),
            str(count),
            "synthetic_count",
            "count",
        )
    else:
        objects = [color] + [rng.choice(others) for _ in range(rng.randint(2, 8))]
        question, answer, source, mode = (
            OBJECTS_LOCATE_QUESTION.format(color=color),
            "",
            "synthetic_locate",
            "locate",
        )
    rng.shuffle(objects)
    img = render_small_objects(rng, objects)
    if mode == "locate":
        answer = locate_quadrant(np.asarray(img), COLORS[color])
    rel = f"images/{split}_{idx:05d}.png"
    img.save(out_dir / rel)
    return {
        "id": f"small_objects-{split}-{idx}",
        "question": question,
        "answer": answer,
        "image_path": rel,
        "data_source": source,
        "extra": {"kind": "small_objects", "color": color, "mode": mode},
    }


def _make_video_event(rng: random.Random, idx: int, out_dir: Path, split: str) -> dict:
    from pyvision_rl.data.video import write_video

    n_frames = rng.randint(24, 48)
    color = rng.choice(VIDEO_COLORS)
    distractor = rng.choice([c for c in VIDEO_COLORS if c != color])
    first = rng.randint(1, n_frames - 1)
    distractor_first = rng.choice([i for i in range(1, n_frames) if i != first])
    frames = render_video_event(rng, n_frames, color, first, distractor, distractor_first)
    rel = f"videos/{split}_{idx:05d}.mp4"
    write_video(out_dir / rel, frames, VIDEO_FPS)
    return {
        "id": f"video_event-{split}-{idx}",
        "question": VIDEO_QUESTION.format(color=color),
        "answer": str(first),
        "video_path": rel,
        "data_source": "synthetic_video_frame",
        "extra": {"kind": "video_event", "color": color},
    }


def _make_video_moment(rng: random.Random, idx: int, out_dir: Path, split: str) -> dict:
    from pyvision_rl.data.video import write_video

    n_frames = rng.randint(*MOMENT_SECONDS) * MOMENT_FPS
    color = rng.choice(VIDEO_COLORS)
    distractor = rng.choice([c for c in VIDEO_COLORS if c != color])
    first = rng.randint(1, n_frames - 1)
    distractor_first = rng.choice([i for i in range(1, n_frames) if i != first])
    frames = render_video_event(
        rng, n_frames, color, first, distractor, distractor_first, MOMENT_SIZE, MOMENT_SQUARE
    )
    rel = f"videos/{split}_{idx:05d}.mp4"
    write_video(out_dir / rel, frames, MOMENT_FPS)
    return {
        "id": f"video_moment-{split}-{idx}",
        "question": MOMENT_QUESTION.format(color=color),
        "answer": str(first // MOMENT_FPS // 10),  # one digit: copied as one token, like the image kinds
        "video_path": rel,
        "data_source": "synthetic_video_event",
        "extra": {"kind": "video_moment", "color": color},
    }


_MAKERS = {
    "color_count": _make_color_count,
    "small_objects": _make_small_objects,
    "video_event": _make_video_event,
    "video_moment": _make_video_moment,
}


def locate_quadrant(pixels: np.ndarray, rgb: tuple[int, int, int]) -> str:
    """Quadrant name of the centroid of the pixels equal to `rgb` (same rule as the expert code)."""
    ys, xs = np.nonzero((pixels[..., :3] == rgb).all(-1))
    h, w = pixels.shape[:2]
    return QUADRANTS[2 * int(ys.mean() >= h / 2) + int(xs.mean() >= w / 2)]


def make_dataset(
    out_dir: str | Path, kind: str = "color_count", n_train: int = 512, n_eval: int = 64, seed: int = 0
) -> tuple[Path, Path]:
    """Write `n_train` + `n_eval` tasks (media + train.jsonl + eval.jsonl, plain JSONL rows) under `out_dir`.

    `kind` is one of `color_count`, `small_objects`, `video_event`, `video_moment` or `mixed` (round-robin
    over the first three).
    Media paths in the rows are relative to `out_dir`. The same seed writes the same files.
    Returns (train.jsonl, eval.jsonl).
    """
    if kind not in (*KINDS, "mixed"):
        raise ValueError(f"unknown synthetic kind {kind!r}; choose one of {', '.join((*KINDS, 'mixed'))}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n, split_seed in (("train", n_train, seed), ("eval", n_eval, seed + 1_000_003)):
        rng = random.Random(f"{kind}-{split}-{split_seed}")
        rows = []
        for i in range(n):
            k = MIXED_KINDS[i % len(MIXED_KINDS)] if kind == "mixed" else kind
            rows.append(_MAKERS[k](rng, i, out, split))
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


# --------------------------------------------------------------------------------------------------
# The scripted expert


def task_kind(task: Task) -> str:
    """The synthetic kind of a task: from `extra["kind"]`, else recognised from its question."""
    kind = task.extra.get("kind")
    if kind in KINDS:
        return kind
    q = task.question
    if q.startswith("In which 10-second part"):
        return "video_moment"
    if "first appear" in q:
        return "video_event"
    if "dot" in q:
        return "small_objects"
    if "squares" in q:
        return "color_count"
    raise ValueError(f"task {task.id!r} is not a synthetic task (question: {q[:80]!r})")


def _question_color(task: Task) -> str:
    """The colour named in the question (the expert reads the question, as a model must)."""
    m = re.search(r"\b(" + "|".join(COLORS) + r")\b", task.question)
    if not m:
        raise ValueError(f"task {task.id!r}: no colour name in the question {task.question!r}")
    return m.group(1)


def expert_code(task: Task) -> str:
    """The Python a competent agent runs for `task` in the sandbox.

    It uses `image_clue_0` / `video_clue_0`, shows ONE small figure with `plt.show()` (so the tool call
    returns an image) and prints the answer as the last stdout line.
    """
    kind, color = task_kind(task), _question_color(task)
    rgb = COLORS[color]
    if kind == "color_count":
        # sample each cell's centre pixel and compare with the colour's RGB
        return (
            "import numpy as np\n"
            "a = np.array(image_clue_0.convert('RGB'))\n"
            f"n = int((a[7::14, 7::14] == {rgb}).all(-1).sum())\n" + _SHOW.format(arr="a") + "print(n)"
        )
    if kind == "small_objects":
        if "quadrant" in task.question:
            return (
                "import numpy as np\n"
                "a = np.array(image_clue_0.convert('RGB'))\n"
                f"ys, xs = np.nonzero((a == {rgb}).all(-1))\n"
                "y, x = int(ys.mean()), int(xs.mean())\n"
                "h, w = a.shape[:2]\n"
                "q = ('top' if y < h / 2 else 'bottom') + '-' + ('left' if x < w / 2 else 'right')\n"
                + _SHOW.format(arr="a[max(y - 28, 0):y + 28, max(x - 28, 0):x + 28]")
                + "print(q)"
            )
        return (
            "import numpy as np\n"
            "a = np.array(image_clue_0.convert('RGB'))\n"
            f"m = (a == {rgb}).all(-1)\n"
            f"n = int(m.sum()) // {OBJ * OBJ}\n" + _SHOW.format(arr="m") + "print(n)"
        )
    ch = VIDEO_CHANNEL[color]
    if kind == "video_moment":
        return _moment_code(ch, seek=True)
    # video_event: a channel threshold that survives lossy coding
    return (
        "import numpy as np\n"
        "v = video_clue_0\n"
        "f = v.get_batch(list(range(len(v)))).asnumpy().astype(int)\n"
        f"m = (f[..., {ch}] > 150) & (f.sum(-1) - f[..., {ch}] < 150)\n"
        "i = int(np.argmax(m.sum((1, 2)) > 20))\n" + _SHOW.format(arr="f[i].astype('uint8')") + "print(i)"
    )


def _moment_code(ch: int, seek: bool) -> str:
    """video_moment code: the same frame test, then binary search (`seek`) or uniform sampling."""
    head = (
        "import numpy as np\n"
        "v = video_clue_0\n"
        "def seen(i):\n"
        "    f = v[i].asnumpy().astype(int)\n"
        f"    return 20 < ((f[..., {ch}] > 150) & (f.sum(-1) - f[..., {ch}] < 150)).sum()\n"
    )
    if seek:  # ~7 frames decoded, one shown
        return (
            head + "lo, hi = 0, -1 + len(v)\n"
            "while lo < hi:\n"
            "    m = int((lo + hi) / 2)\n"
            "    lo, hi = (lo, m) if seen(m) else (m + 1, hi)\n"
            "plt.figure(figsize=(1.12, 1.12))\n"
            "plt.imshow(v[lo].asnumpy())\n"
            "plt.show()\n"
            "print(int(lo // v.get_avg_fps() // 10), '(10-second part)')"
        )
    return (  # naive: NAIVE_FRAMES frames sampled uniformly and all shown; the answer is their resolution
        head + f"idx = np.linspace(0, len(v) - 1, {NAIVE_FRAMES}).astype(int)\n"
        "for f in v.get_batch(idx).asnumpy():\n"
        "    plt.figure(figsize=(1.12, 1.12))\n"
        "    plt.imshow(f)\n"
        "    plt.show()\n"
        "i = next(i for i in idx if seen(i))\n"
        "print(int(i // v.get_avg_fps() // 10), '(10-second part)')"
    )


def naive_answer(task: Task) -> str:
    """What the naive video_moment code prints, recomputed on the host from the decoded frames."""
    from pyvision_rl.data.video import VideoReader

    v = VideoReader(task.videos[0])
    ch = VIDEO_CHANNEL[_question_color(task)]
    f = v.get_batch(np.linspace(0, len(v) - 1, NAIVE_FRAMES).astype(int)).asnumpy().astype(int)
    hit = ((f[..., ch] > 150) & (f.sum(-1) - f[..., ch] < 150)).sum((1, 2)) > 20
    i = int(np.linspace(0, len(v) - 1, NAIVE_FRAMES).astype(int)[int(np.argmax(hit))])
    return str(int(i // v.get_avg_fps() // 10))


def answer_text(answer: str) -> str:
    """The protocol's final-answer turn."""
    return f"<answer>\n\\boxed{{{answer}}}\n</answer>"


def code_text(code: str) -> str:
    """The protocol's code turn (generation stops at, and keeps, `</code>`)."""
    return f"<code>\n```python\n{code}\n```\n</code>"


def expert_turns(task: Task, use_tool: bool) -> list[str]:
    """The model-side texts of an expert trajectory: [code turn, answer turn] or [answer turn].

    For `video_moment`, `use_tool=False` is the naive strategy instead of a direct answer (a video cannot
    be answered without looking): uniform sampling, NAIVE_FRAMES frames shown, and the answer it prints.
    """
    if use_tool:
        return [code_text(expert_code(task)), answer_text(task.answer)]
    if task_kind(task) == "video_moment":
        ch = VIDEO_CHANNEL[_question_color(task)]
        return [code_text(_moment_code(ch, seek=False)), answer_text(naive_answer(task))]
    return [answer_text(task.answer)]


def tokenizer_corpus(seed: int = 0, n_per_kind: int = 200) -> list[str]:
    """Texts the tiny model's tokenizer is trained on: questions, expert code and answers of every kind.

    Only text is produced (no media is rendered), so it is fast and needs no disk.
    """
    rng = random.Random(f"corpus-{seed}")
    texts: list[str] = []
    for i in range(n_per_kind):
        color = rng.choice(list(COLORS))
        vcolor = rng.choice(VIDEO_COLORS)
        tasks = [
            Task(
                f"c{i}",
                COUNT_QUESTION.format(color=color),
                str(rng.randint(0, 9)),
                extra={"kind": "color_count"},
            ),
            Task(
                f"o{i}",
                OBJECTS_COUNT_QUESTION.format(color=color),
                str(rng.randint(0, 6)),
                extra={"kind": "small_objects"},
            ),
            Task(
                f"l{i}",
                OBJECTS_LOCATE_QUESTION.format(color=color),
                rng.choice(QUADRANTS),
                extra={"kind": "small_objects"},
            ),
            Task(
                f"v{i}",
                VIDEO_QUESTION.format(color=vcolor),
                str(rng.randint(1, 47)),
                extra={"kind": "video_event"},
            ),
        ]
        for t in tasks:
            texts.append(t.question)
            texts.extend(expert_turns(t, use_tool=True))
            texts.append(str(t.answer) + "\n")
    return texts


def extra_tokenizer_corpus(kind: str, seed: int = 0, n: int = 200) -> list[str]:
    """Texts of `kind` that `tokenizer_corpus` leaves out, for a tiny model trained on that kind alone.

    Only `video_moment` has any: its code turns are long, and adding them to the shared corpus would take
    BPE merges from the image kinds (the default vocabulary is full), so its tiny model gets its own
    vocabulary (`make_tiny_model(..., extra_corpus=...)`, with a larger `model.tiny.vocab_size`): the
    prompt, code, answer and video-tool observation texts, each many times, so that they become few
    tokens. No digit is ever next to a newline here (nor at a code line's end), and the code prints the
    digit followed by MOMENT_UNIT, so the printed digit in `Text Result:\n3 (10-second part)` and the one
    in `\\boxed{3}` are the same single token (the copy the model learns).
    """
    if kind != "video_moment":
        return []
    from pyvision_rl.agent.protocol import build_video_prompt

    rng = random.Random(f"corpus-{kind}-{seed}")
    # the observation's text around its digit and vision blocks (vision tokens are special: never merged)
    obs = [
        "user\n<tool_response>\n<interpreter>\nText Result:\n",
        f"{MOMENT_UNIT}\nImage Result:\n<image_clue_0>",
        *(f"</image_clue_{k}><image_clue_{k + 1}>" for k in range(NAIVE_FRAMES - 1)),
        *(f"</image_clue_{k}></interpreter>\n\n</tool_response>" for k in range(NAIVE_FRAMES)),
        "assistant\n",
    ]
    texts: list[str] = []
    for _ in range(n):
        color = rng.choice(VIDEO_COLORS)
        ch = VIDEO_CHANNEL[color]
        n_frames = rng.randint(*MOMENT_SECONDS) * MOMENT_FPS
        question = MOMENT_QUESTION.format(color=color)
        prompt = build_video_prompt(
            question, MOMENT_SIZE, MOMENT_SIZE, n_frames, MOMENT_FPS, "tiny_tool_video"
        )
        texts += ["user\n" + prompt, answer_text(str(rng.randint(0, 8))), *obs]
        texts += [code_text(_moment_code(ch, seek)) for seek in (True, False)]
    return texts
