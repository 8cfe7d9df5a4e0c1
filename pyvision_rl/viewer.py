"""The rollout viewer: self-contained HTML pages of trajectories, a per-run index, and `pyvision-rl view`.

A page is a pure function of trajectories (plus whether each was accepted and why not): one card per
trajectory with the input image, every turn split from the token ids by the loss mask (model tokens vs
observation tokens), the code highlighted, the interpreter's output and figures inline, and the scores.
Images are embedded as data URIs and the filters are plain JavaScript, so a page opens from disk with no
server and no network. `pyvision-rl view RUN_DIR` serves a run's pages on localhost.

Nothing here imports torch, transformers or Ray: the CLI registers `view` from this module.
"""

from __future__ import annotations

import base64
import html
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvision_rl.types import ImageRef, Trajectory

Decode = Callable[[list[int]], str]

_VISION_BLOCK = re.compile(r"<\|vision_start\|>(?:<\|(?:image|video)_pad\|>)*<\|vision_end\|>")
_CODE_BLOCK = re.compile(r"(<code>\s*```python\n)(.*?)(```\s*</code>|$)", re.S)
_MIME = (
    (b"\x89PNG", "image/png"),
    (b"\xff\xd8", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"RIFF", "image/webp"),
)


@dataclass
class ViewItem:
    """One trajectory as the viewer shows it: `accepted` by the filters, or dropped for `reason`."""

    traj: Trajectory
    accepted: bool
    reason: str = ""


@dataclass
class Segment:
    """A contiguous run of the token stream: the prompt, a model turn or an observation."""

    kind: str  # "prompt" | "model" | "observation"
    text: str
    n_tokens: int
    images: list[ImageRef] = field(default_factory=list)


def items_from_summaries(
    trajs: Sequence[Trajectory],
    summaries: Sequence[dict[str, Any]],
    trained: set[int] | None = None,
    filters: Any = None,
) -> list[ViewItem]:
    """ViewItems for trajectories fetched as the rollout left them, scored elsewhere: `summaries[i]` is the
    RewardService's summary of `trajs[i]` (scores and advantage are copied over). `trained`: indices the
    step trained on (None: an eval, everything shown as accepted); any other trajectory is shown with the
    first filter of `filters` (`reward.filters`) that drops it, or `ranked_out` when it survived them but
    the group-std ranking did not keep it."""
    from pyvision_rl.config import FilterConfig
    from pyvision_rl.rewards.filters import DROP_REASONS, SANDBOX_ERROR, select_for_training

    cfg = filters or FilterConfig()
    groups: dict[str, list[float]] = {}
    for s in summaries:
        if s["end_reason"] != SANDBOX_ERROR:
            groups.setdefault(s["group_id"], []).append(s["reward"])
    items = []
    for i, (t, s) in enumerate(zip(trajs, summaries, strict=True)):
        for k in ("reward", "acc", "advantage", "group_std"):
            if k in s:
                setattr(t, k, s[k])
        if trained is None or i in trained:
            items.append(ViewItem(t, True))
            continue
        rs = groups.get(s["group_id"], [])
        drops: dict[str, int] = {}
        if cfg.drop_zero_std and s["end_reason"] != SANDBOX_ERROR and len(rs) > 1 and max(rs) == min(rs):
            drops["zero_std"] = 1  # the group-level filter, judged on the whole group
        select_for_training([s], 0, cfg, drops=drops)  # the per-trajectory filters, on this one alone
        reason = next((r for r in DROP_REASONS if drops.get(r)), "ranked_out")
        items.append(ViewItem(t, False, reason))
    return items


def tokenizer_decoder(model_dir: str | Path) -> Decode:
    """`ids -> text` (special tokens kept) from the checkpoint's tokenizer.json, without transformers."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    return lambda ids: tok.decode(list(ids), skip_special_tokens=False)


def split_turns(t: Trajectory, decode: Decode) -> list[Segment]:
    """The prompt, then the response cut where `loss_mask` changes: 1-runs are model turns, 0-runs are
    observations. Images are handed out in order, one per vision block in the decoded text."""
    mask = list(t.loss_mask) + [1] * (len(t.response_ids) - len(t.loss_mask))  # a short mask: model tokens
    runs: list[tuple[str, list[int]]] = [("prompt", list(t.prompt_ids))]
    for tok, m in zip(t.response_ids, mask, strict=False):
        kind = "model" if m else "observation"
        if runs[-1][0] != kind:
            runs.append((kind, []))
        runs[-1][1].append(tok)
    images = list(t.images)
    out = []
    for kind, ids in runs:
        text = decode(ids)
        n = len(_VISION_BLOCK.findall(text))
        out.append(Segment(kind, text, len(ids), images[:n]))
        images = images[n:]
    return out


def _data_uri(data: bytes) -> str:
    mime = next((m for magic, m in _MIME if data.startswith(magic)), "image/png")
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _img(im: ImageRef) -> str:
    t, h, w = im.grid_thw
    return (
        f'<img src="{_data_uri(im.png)}" title="{im.source} image, grid {t}x{h}x{w}" alt="{im.source} image">'
    )


def _highlight(code: str) -> str:
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer

    return highlight(code, PythonLexer(), HtmlFormatter(noclasses=True, nowrap=True, style="friendly"))


def _segment_html(seg: Segment, embed: bool = True) -> str:
    """Escaped text with each vision block replaced by its image (a marker if not `embed`: the prompt's
    images are shown once, above it) and, in model turns, the code highlighted."""
    images = iter(seg.images)
    pieces = _VISION_BLOCK.split(seg.text)
    parts = []
    for i, piece in enumerate(pieces):
        if seg.kind == "model":
            pos = 0
            for m in _CODE_BLOCK.finditer(piece):
                parts.append(html.escape(piece[pos : m.start()] + m.group(1)))
                parts.append(f'<span class="code">{_highlight(m.group(2))}</span>')
                parts.append(html.escape(m.group(3)))
                pos = m.end()
            parts.append(html.escape(piece[pos:]))
        else:
            parts.append(html.escape(piece))
        if i < len(pieces) - 1:
            im = next(images, None)
            if im is None:
                parts.append('<span class="missing">[image missing]</span>')
            else:
                parts.append(_img(im) if embed else f'<span class="marker">[{im.source} image {i}]</span>')
    return "".join(parts)


def _fmt(x: float) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _card(item: ViewItem, decode: Decode, index: int) -> str:
    t = item.traj
    segs = split_turns(t, decode)
    end = getattr(t.end_reason, "value", str(t.end_reason))
    correct = t.acc >= 0.5
    status = "accepted" if item.accepted else f"filtered: {item.reason or '?'}"
    badges = [
        (status, "ok" if item.accepted else "drop"),
        ("correct" if correct else "wrong", "ok" if correct else "drop"),
        (f"reward {_fmt(t.reward)}", ""),
        (f"acc {_fmt(t.acc)}", ""),
        (f"advantage {t.advantage:+.3f}", ""),
        (f"end {end}", ""),
        (f"tool calls {t.n_tool_calls}/{t.n_tool_attempts}", ""),
        (
            f"tokens {len(t.prompt_ids)} prompt + {len(t.response_ids)} response ({sum(t.loss_mask)} model)",
            "",
        ),
        (f"visual tokens {t.visual_tokens}", ""),
        (f"weights v{t.version}", ""),
    ]
    head = "".join(f'<span class="badge {c}">{html.escape(s)}</span>' for s, c in badges)
    prompt = segs[0]
    turns, k = [], 0
    for seg in segs[1:]:
        k += seg.kind == "model"
        label = f"assistant turn {k}" if seg.kind == "model" else "observation"
        turns.append(
            f'<div class="turn {seg.kind}"><div class="label">{label} · {seg.n_tokens} tokens</div>'
            f"<pre>{_segment_html(seg)}</pre></div>"
        )
    return (
        f'<article class="card" id="t{index}" data-accepted="{int(item.accepted)}" '
        f'data-reason="{html.escape(item.reason)}" data-correct="{int(correct)}">'
        f"<h3>{html.escape(t.task_id)} <small>group {html.escape(t.group_id)}</small></h3>"
        f'<div class="badges">{head}</div>'
        f'<div class="answer">answer <code>{html.escape(str(t.final_answer))}</code> · ground truth '
        f"<code>{html.escape(t.ground_truth)}</code></div>"
        f'<div class="inputs">{"".join(_img(im) for im in prompt.images)}</div>'
        f"<details><summary>prompt · {prompt.n_tokens} tokens</summary>"
        f"<pre>{_segment_html(prompt, embed=False)}</pre></details>"
        f"{''.join(turns)}</article>"
    )


_CSS = """
body{font:14px system-ui,sans-serif;margin:0;background:#f4f5f7;color:#222}
header.top{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:8px 16px;z-index:1}
header.top h1{font-size:17px;margin:0 0 6px}
.filters label{margin-right:14px}
main{padding:12px 16px;display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:10px 12px;overflow:hidden}
.card[hidden]{display:none}
.card h3{margin:0 0 6px;font-size:15px}.card h3 small{color:#777;font-weight:normal}
.badge{display:inline-block;background:#eef;border-radius:10px;padding:1px 8px;margin:0 4px 4px 0;font-size:12px}
.badge.ok{background:#d8f5dd}.badge.drop{background:#fbdcdc}
.answer{margin:4px 0;font-size:13px}
.inputs img,.turn img{max-width:240px;image-rendering:pixelated;border:1px solid #ccc;margin:4px;vertical-align:top}
pre{white-space:pre-wrap;word-break:break-word;margin:4px 0;font:12px ui-monospace,monospace}
.turn{border-left:4px solid #88a;padding:2px 8px;margin:6px 0}
.turn.model{border-color:#4a7;background:#f7fcf8}.turn.observation{border-color:#c93;background:#fffaf0}
.label{font-size:11px;color:#666}.code{display:block;background:#f0f3f0;padding:2px 4px}
.missing{color:#b00}.marker{color:#46a}
"""

_JS = """
function applyFilters(){
  const st=document.getElementById('f-status').value, co=document.getElementById('f-correct').value;
  let n=0;
  for(const c of document.querySelectorAll('.card')){
    const d=c.dataset;
    const okS = st==='all' || (st==='accepted' && d.accepted==='1') || (st==='filtered' && d.accepted==='0')
      || (st.startsWith('reason:') && d.accepted==='0' && d.reason===st.slice(7));
    const okC = co==='all' || (co==='correct') === (d.correct==='1');
    c.hidden = !(okS && okC); n += okS && okC;
  }
  document.getElementById('shown').textContent = n;
}
document.getElementById('f-status').addEventListener('change', applyFilters);
document.getElementById('f-correct').addEventListener('change', applyFilters);
applyFilters();
"""


def render_page(items: Sequence[ViewItem], decode: Decode, title: str) -> str:
    """A self-contained HTML page with one card per item and the accepted/reason/correctness filters."""
    reasons = sorted({i.reason for i in items if not i.accepted and i.reason})
    opts = ['<option value="all">all</option>', '<option value="accepted">accepted</option>']
    opts.append('<option value="filtered">filtered (any reason)</option>')
    opts += [f'<option value="reason:{html.escape(r)}">filtered: {html.escape(r)}</option>' for r in reasons]
    cards = "".join(_card(it, decode, i) for i, it in enumerate(items))
    return (
        '<!doctype html><html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f'<header class="top"><h1>{html.escape(title)}</h1><div class="filters">'
        f'<label>status <select id="f-status">{"".join(opts)}</select></label>'
        '<label>answer <select id="f-correct"><option value="all">all</option>'
        '<option value="correct">correct</option><option value="wrong">wrong</option></select></label>'
        f'<span>showing <b id="shown">{len(items)}</b> of {len(items)} trajectories</span>'
        ' · <a href="index.html">all pages</a></div></header>'
        f"<main>{cards}</main><script>{_JS}</script></body></html>"
    )


def write_rollout_page(
    rollouts_dir: str | Path, name: str, items: Sequence[ViewItem], decode: Decode, title: str
) -> Path:
    """Write `<rollouts_dir>/<name>.html` and refresh the run's `index.html` (listed from `index.json`)."""
    d = Path(rollouts_dir)
    d.mkdir(parents=True, exist_ok=True)
    page = d / f"{name}.html"
    page.write_text(render_page(items, decode, title), encoding="utf-8")
    manifest = d / "index.json"
    entries = [
        e for e in (json.loads(manifest.read_text()) if manifest.exists() else []) if e["name"] != name
    ]
    n = max(len(items), 1)
    entries.append(
        {
            "name": name,
            "title": title,
            "trajectories": len(items),
            "accepted": sum(i.accepted for i in items),
            "acc_mean": round(sum(i.traj.acc for i in items) / n, 4),
            "reward_mean": round(sum(i.traj.reward for i in items) / n, 4),
            "tool_calls_mean": round(sum(i.traj.n_tool_calls for i in items) / n, 3),
            "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )
    manifest.write_text(json.dumps(entries, indent=1))
    rows = "".join(
        f'<tr><td><a href="{html.escape(e["name"])}.html">{html.escape(e["title"])}</a></td>'
        f"<td>{e['trajectories']}</td><td>{e['accepted']}</td><td>{e['acc_mean']}</td>"
        f"<td>{e['reward_mean']}</td><td>{e['tool_calls_mean']}</td><td>{e['written']}</td></tr>"
        for e in entries
    )
    (d / "index.html").write_text(
        '<!doctype html><html><head><meta charset="utf-8"><title>rollouts</title>'
        "<style>body{font:14px system-ui,sans-serif;margin:16px}td,th{padding:3px 10px;text-align:left}"
        "tr:nth-child(even){background:#f4f4f4}</style></head><body><h1>Rollout pages</h1><table>"
        "<tr><th>page</th><th>trajectories</th><th>accepted</th><th>acc</th><th>reward</th>"
        f"<th>tool calls</th><th>written</th></tr>{rows}</table></body></html>",
        encoding="utf-8",
    )
    return page


def table_rows(items: Sequence[ViewItem], decode: Decode) -> list[dict[str, Any]]:
    """The same sample as flat rows (for a wandb Table): scores, the input image's bytes, the turns' text."""
    rows = []
    for it in items:
        t = it.traj
        segs = split_turns(t, decode)
        rows.append(
            {
                "task_id": t.task_id,
                "group_id": t.group_id,
                "status": "accepted" if it.accepted else f"filtered: {it.reason}",
                "reward": t.reward,
                "acc": t.acc,
                "advantage": t.advantage,
                "end_reason": getattr(t.end_reason, "value", str(t.end_reason)),
                "tool_calls": t.n_tool_calls,
                "response_tokens": len(t.response_ids),
                "version": t.version,
                "image": segs[0].images[0].png if segs[0].images else None,
                "turns": "\n".join(_VISION_BLOCK.sub("<image>", s.text) for s in segs[1:]),
            }
        )
    return rows


# ------------------------------------------------------------------------------------------- `view`
def _view(args: Any) -> int:
    import functools
    import http.server

    root = Path(args.run_dir)
    root = root / "rollouts" if (root / "rollouts").is_dir() else root
    if not (root / "index.html").is_file():
        raise FileNotFoundError(
            f"{args.run_dir}: no rollouts/index.html. Pages are written every logging.rollouts_every "
            "steps and at every eval; pass a run directory such as runs/tiny-cpu."
        )

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:  # one line per request is noise here
            pass

    handler = functools.partial(Quiet, directory=str(root))
    with http.server.ThreadingHTTPServer((args.host, args.port), handler) as srv:
        print(
            f"serving {root} at http://{args.host}:{srv.server_address[1]}/index.html (Ctrl-C stops)",
            flush=True,
        )
        try:
            srv.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


def register(subparsers: Any) -> None:
    """Add `view RUN_DIR` to the `pyvision-rl` command."""
    p = subparsers.add_parser(
        "view", help="serve a run's rollout viewer pages on localhost and print the URL"
    )
    p.add_argument("run_dir", help="run directory (runs/<name>) or its rollouts/ folder")
    p.add_argument("--port", type=int, default=8765, help="port (0: any free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.set_defaults(func=_view)
