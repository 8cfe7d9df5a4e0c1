"""Load `Task`s from PyVision-RL rows or plain JSONL / JSON / Parquet, checking every row and its media.

Two row shapes are accepted (README, "Using it"), per row, in any of the three file formats:

- PyVision-RL / verl rows: `prompt` (chat messages; the user text holds `<image>` + the formatted template),
  `reward_model.ground_truth`, `extra_info` (`question`, `index`, ...), `data_source`, `env_name`,
  `ability`, and the media either in `mm_hint` (`{"hint_path", "hint_type": "image"|"video"}`) or in
  `images` / `videos` (a path, `{"path": ...}`, `{"image": ...}` or `{"bytes": ...}` as HF datasets
  writes images into Parquet, or a list of these).
- Plain rows: `question`, `answer`, `image_path` or `video_path` (a string or a list), optional
  `data_source`, `id` and `extra` (a dict kept on the Task).

Relative media paths resolve against the data file's directory, or `media_root` (the released data's
image root; `strip_prefix` re-roots absolute paths written on another machine). Embedded image bytes are
written once to
`<data file>.media/` (content-addressed) so that a Task always holds file paths.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pyvision_rl.types import Task


class DataError(ValueError):
    """A dataset row the user must fix; the message names the file, the row and the field."""

    def __init__(
        self, file: str | Path, row: int | None, field: str | None, problem: str, fix: str = ""
    ) -> None:
        self.file, self.row, self.field, self.problem = str(file), row, field, problem
        where = (
            f"{file}" + (f", row {row}" if row is not None else "") + (f", field '{field}'" if field else "")
        )
        msg = f"{where}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


_SKIP_HINT = "fix the row, or set data.skip_bad_rows=true to skip and count bad rows"


def _read_rows(path: Path) -> list[tuple[int, Any]]:
    """(1-based row number, raw row) pairs. For JSONL the row number is the line number."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise DataError(path, None, None, f"cannot read Parquet: {e}") from e
        return list(enumerate(table.to_pylist(), start=1))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, None, None, f"not UTF-8 text: {e}") from e
    if suffix == ".jsonl" or (suffix != ".json" and not text.lstrip().startswith("[")):
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((lineno, _BadJSON(str(e))))
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            path, None, None, f"invalid JSON: {e}", "a .json file must hold a list of rows"
        ) from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(path, None, None, f"expected a JSON list of rows, got {type(data).__name__}")
    return list(enumerate(data, start=1))


def _get(raw: dict, key: str, default: Any) -> Any:
    """raw[key], with None (a missing Parquet cell) meaning absent."""
    value = raw.get(key)
    return default if value is None else value


class _BadJSON:
    def __init__(self, error: str) -> None:
        self.error = error


class _RowParser:
    """Turns one raw row into a Task, raising DataError with file/row/field on the first problem."""

    def __init__(
        self,
        path: Path,
        media_dir: Path | None,
        check_media: bool,
        media_root: Path | None = None,
        strip_prefix: str = "",
    ) -> None:
        self.path = path
        self.base = media_root or path.parent
        self.strip_prefix = strip_prefix
        self.media_dir = media_dir or path.with_name(path.name + ".media")
        self.check_media = check_media
        self.row = 0

    def error(self, field: str | None, problem: str, fix: str = _SKIP_HINT) -> DataError:
        return DataError(self.path, self.row, field, problem, fix)

    # ---- fields

    def _str(self, value: Any, field: str, allow_empty: bool = False) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error(field, f"expected a string, got {type(value).__name__}")
        text = str(value)
        if not allow_empty and not text.strip():
            raise self.error(field, "is empty")
        return text

    def _media_list(self, value: Any, field: str) -> list[Any]:
        if value is None:
            return []
        if isinstance(value, (str, dict, bytes)):
            return [value]
        if isinstance(value, list):
            return value
        raise self.error(field, f"expected a path or a list of paths, got {type(value).__name__}")

    def _media_path(self, item: Any, field: str, kind: str) -> Path:
        """A local path for a media item: a string path, {'path'|'image'|'video': ...} or {'bytes': ...}."""
        if isinstance(item, dict):
            if item.get("bytes"):
                return self._write_bytes(item["bytes"], field)
            for key in ("path", kind, "hint_path", "image_url"):
                if isinstance(item.get(key), str) and item[key]:
                    item = item[key]
                    break
            else:
                raise self.error(field, f"a {kind} entry needs 'path' or 'bytes', got keys {sorted(item)}")
        if isinstance(item, bytes):
            return self._write_bytes(item, field)
        if not isinstance(item, str) or not item:
            raise self.error(field, f"expected a {kind} path, got {type(item).__name__}")
        if self.strip_prefix and item.startswith(self.strip_prefix):
            item = item[len(self.strip_prefix) :].lstrip("/")
        p = Path(item).expanduser()
        return p if p.is_absolute() else self.base / p

    def _write_bytes(self, data: bytes, field: str) -> Path:
        digest = hashlib.sha256(data).hexdigest()[:24]
        out = self.media_dir / f"{digest}.img"
        if not out.is_file():
            try:
                self.media_dir.mkdir(parents=True, exist_ok=True)
                tmp = out.with_suffix(f".tmp{id(data)}")
                tmp.write_bytes(data)
                tmp.replace(out)
            except OSError as e:
                raise self.error(
                    field,
                    f"cannot write embedded image bytes to {self.media_dir}: {e}",
                    "pass media_dir= a writable directory",
                ) from e
        return out

    def _check_image(self, p: Path, field: str) -> tuple[int, int]:
        from PIL import Image, UnidentifiedImageError

        if not p.is_file():
            raise self.error(
                field,
                f"image file not found: {p}",
                f"check the path (relative paths resolve against {self.base}) or " + _SKIP_HINT,
            )
        try:
            with Image.open(p) as im:
                size = im.size
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise self.error(
                field, f"unreadable image {p}: {e}", "re-export the image or " + _SKIP_HINT
            ) from e
        return size

    def _check_video(self, p: Path, field: str) -> dict:
        from pyvision_rl.data.video import probe_video

        if not p.is_file():
            raise self.error(
                field,
                f"video file not found: {p}",
                f"check the path (relative paths resolve against {self.base}) or " + _SKIP_HINT,
            )
        try:
            info = probe_video(p)
        except Exception as e:
            raise self.error(
                field, f"unreadable video {p}: {e}", "re-encode it (e.g. H.264 mp4) or " + _SKIP_HINT
            ) from e
        if info.n_frames <= 0:
            raise self.error(field, f"video {p} has no frames")
        return {"width": info.width, "height": info.height, "n_frames": info.n_frames, "fps": info.fps}

    # ---- rows

    def parse(self, row_no: int, raw: Any) -> Task:
        self.row = row_no
        if isinstance(raw, _BadJSON):
            raise self.error(None, f"invalid JSON: {raw.error}")
        if not isinstance(raw, dict):
            raise self.error(None, f"expected an object (dict) per row, got {type(raw).__name__}")
        if "prompt" in raw or "reward_model" in raw:
            task, image_fields, video_fields = self._pyvision(raw)
        else:
            task, image_fields, video_fields = self._plain(raw)
        images, videos = [], []
        for field, item in image_fields:
            p = self._media_path(item, field, "image")
            if self.check_media:
                task.extra.setdefault("image_sizes", []).append(list(self._check_image(p, field)))
            images.append(str(p))
        for field, item in video_fields:
            p = self._media_path(item, field, "video")
            if self.check_media:
                task.extra.setdefault("video_info", []).append(self._check_video(p, field))
            videos.append(str(p))
        task.images, task.videos = images, videos
        task.extra.setdefault("source", f"{self.path}:{row_no}")
        return task

    def _plain(self, raw: dict) -> tuple[Task, list, list]:
        for field in ("question", "answer"):
            if field not in raw or raw[field] is None:
                raise self.error(field, "missing", f"each row needs 'question' and 'answer'; {_SKIP_HINT}")
        question = self._str(raw["question"], "question")
        answer = self._str(raw["answer"], "answer")
        source = self._str(_get(raw, "data_source", "default"), "data_source")
        rid = self._str(_get(raw, "id", f"{self.path.stem}-{self.row}"), "id")
        extra = raw.get("extra") or {}
        if not isinstance(extra, dict):
            raise self.error("extra", f"expected an object, got {type(extra).__name__}")
        image_fields = [("image_path", x) for x in self._media_list(raw.get("image_path"), "image_path")]
        image_fields += [("images", x) for x in self._media_list(raw.get("images"), "images")]
        video_fields = [("video_path", x) for x in self._media_list(raw.get("video_path"), "video_path")]
        video_fields += [("videos", x) for x in self._media_list(raw.get("videos"), "videos")]
        return Task(rid, question, answer, source, extra=dict(extra)), image_fields, video_fields

    def _pyvision(self, raw: dict) -> tuple[Task, list, list]:
        rm = raw.get("reward_model")
        if not isinstance(rm, dict):
            raise self.error(
                "reward_model",
                "missing or not an object"
                if rm is None
                else f"expected an object with 'ground_truth', got {type(rm).__name__}",
            )
        if rm.get("ground_truth") is None:
            raise self.error("reward_model.ground_truth", "missing")
        gt = rm["ground_truth"]
        answer = (
            json.dumps(gt) if isinstance(gt, (list, dict)) else self._str(gt, "reward_model.ground_truth")
        )
        info = raw.get("extra_info") or {}
        if not isinstance(info, dict):
            raise self.error("extra_info", f"expected an object, got {type(info).__name__}")
        prompt_text = self._prompt_text(raw.get("prompt"))
        if info.get("question") is not None:
            question = self._str(info["question"], "extra_info.question")
        elif prompt_text:
            # no raw question: keep the prompt's text without the image marker (it holds the template too)
            question = prompt_text.replace("<image>", "").replace("<video>", "").strip()
        else:
            raise self.error("extra_info.question", "missing (and no 'prompt' text to fall back on)")
        source = self._str(_get(raw, "data_source", "default"), "data_source")
        index = _get(info, "index", _get(raw, "id", self.row))
        extra: dict[str, Any] = {k: raw[k] for k in ("env_name", "ability") if raw.get(k) is not None}
        if prompt_text:
            extra["prompt"] = prompt_text
        image_fields, video_fields = [], []
        hint = raw.get("mm_hint")
        if hint is not None:
            if not isinstance(hint, dict) or "hint_path" not in hint:
                raise self.error("mm_hint", "expected an object with 'hint_path' and 'hint_type'")
            htype = hint.get("hint_type", "image")
            if htype not in ("image", "video"):
                raise self.error("mm_hint.hint_type", f"expected 'image' or 'video', got {htype!r}")
            (image_fields if htype == "image" else video_fields).append(
                ("mm_hint.hint_path", hint["hint_path"])
            )
        image_fields += [("images", x) for x in self._media_list(raw.get("images"), "images")]
        video_fields += [("videos", x) for x in self._media_list(raw.get("videos"), "videos")]
        task = Task(f"{source}-{index}", question, answer, source, extra=extra)
        return task, image_fields, video_fields

    def _prompt_text(self, prompt: Any) -> str:
        if prompt is None:
            return ""
        if isinstance(prompt, str):
            return prompt
        if not isinstance(prompt, list):
            raise self.error("prompt", f"expected a list of chat messages, got {type(prompt).__name__}")
        texts = []
        for m in prompt:
            if not isinstance(m, dict) or "content" not in m:
                raise self.error("prompt", "each message needs 'role' and 'content'")
            if m.get("role", "user") != "user":
                continue
            c = m["content"]
            if isinstance(c, list):
                c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
            texts.append(str(c))
        return "\n".join(texts)


def load_tasks(
    path: str | Path,
    skip_bad: bool = False,
    stats: dict | None = None,
    media_dir: str | Path | None = None,
    check_media: bool = True,
    media_root: str | Path | None = None,
    strip_prefix: str = "",
) -> list[Task]:
    """Load every row of a JSONL / JSON / Parquet file as a `Task` (see the module doc for the row shapes).

    A bad row (missing field, wrong type, missing or unreadable image/video) raises `DataError` naming the
    file, row and field. With `skip_bad=True` bad rows are skipped instead and counted in `stats`
    (`stats["loaded"]`, `stats["skipped"]`, `stats["reasons"]` {field: count}, `stats["errors"]` the first
    20 messages). `check_media=False` skips opening every image/video (faster for huge sets).
    `media_root`: resolve relative media paths against it instead of the file's directory; `strip_prefix`:
    a media path starting with it loses it and resolves against `media_root` too.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "data file not found", "check data.train_path / data.eval_path")
    parser = _RowParser(
        path,
        Path(media_dir) if media_dir else None,
        check_media,
        Path(media_root) if media_root else None,
        strip_prefix,
    )
    stats = stats if stats is not None else {}
    stats.setdefault("skipped", 0)
    stats.setdefault("reasons", {})
    stats.setdefault("errors", [])
    tasks: list[Task] = []
    seen: dict[str, int] = {}
    for row_no, raw in _read_rows(path):
        try:
            task = parser.parse(row_no, raw)
            if task.id in seen:
                raise parser.error("id", f"duplicate id {task.id!r} (first at row {seen[task.id]})")
        except DataError as e:
            if not skip_bad:
                raise
            stats["skipped"] += 1
            key = e.field or "row"
            stats["reasons"][key] = stats["reasons"].get(key, 0) + 1
            if len(stats["errors"]) < 20:
                stats["errors"].append(str(e))
            continue
        seen[task.id] = row_no
        tasks.append(task)
    stats["loaded"] = len(tasks)
    return tasks
