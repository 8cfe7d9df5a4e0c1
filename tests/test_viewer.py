"""The rollout viewer: turn splitting by the loss mask, drop reasons, and the page a real tiny run writes,
loaded in a real headless Chromium (DevTools protocol): cards, decoded images, filters, no network."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import png, tiny_overrides

from pyvision_rl.agent import protocol
from pyvision_rl.types import EndReason, ImageRef, Trajectory
from pyvision_rl.viewer import (
    ViewItem,
    items_from_summaries,
    render_page,
    split_turns,
    tokenizer_decoder,
    write_rollout_page,
)

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]


def _traj(tok, with_figure: bool = True) -> Trajectory:
    """A trajectory assembled segment by segment the way the agent loop does: prompt, a code turn, its
    observation (one figure), the answer turn."""
    enc = lambda s: list(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    prompt = enc(protocol.render_prompt("<image>\nHow many red squares?", [4]))
    code = "<code>\n```python\nimport numpy as np\nprint(int(np.sum([1, 2])))\nplt.show()\n```\n</code>"
    obs = protocol.render_observation("3", [4] if with_figure else (), first_index=1)
    answer = "<answer>\n\\boxed{3}\n</answer><|im_end|>"
    segs = [(enc(code), 1), (enc(obs), 0), (enc(answer), 1)]
    images = [ImageRef(png(28, 28, "red"), (1, 2, 2), "input")]
    if with_figure:
        images.append(ImageRef(png(56, 28, "blue"), (1, 2, 4), "tool"))
    return Trajectory(
        task_id="t0",
        group_id="g0",
        prompt_ids=prompt,
        response_ids=[i for ids, _ in segs for i in ids],
        loss_mask=[m for ids, m in segs for _ in ids],
        images=images,
        n_tool_calls=1,
        n_tool_attempts=1,
        n_tool_images=int(with_figure),
        end_reason=EndReason.DONE,
        final_answer="3",
        ground_truth="3",
        acc=1.0,
        reward=1.1,
        advantage=0.25,
        version=3,
    )


def test_turns_split_by_loss_mask_with_images_in_place(tiny_model_dir):
    from pyvision_rl.models import load_processor

    tok = load_processor(tiny_model_dir).tokenizer
    t = _traj(tok)
    segs = split_turns(t, tokenizer_decoder(tiny_model_dir))
    assert [s.kind for s in segs] == ["prompt", "model", "observation", "model"]
    assert sum(s.n_tokens for s in segs[1:]) == len(t.response_ids)
    assert [len(s.images) for s in segs] == [1, 0, 1, 0]
    assert segs[2].images[0].source == "tool" and "Text Result:\n3" in segs[2].text
    assert segs[1].text.startswith("<code>") and segs[3].text.endswith("<|im_end|>")
    page = render_page([ViewItem(t, True)], tokenizer_decoder(tiny_model_dir), "t")
    assert page.count("<img ") == 2 and "<|image_pad|>" not in page  # vision blocks became the images
    assert "advantage +0.250" in page and "weights v3" in page and "end DONE" in page
    assert 'style="color' in page  # the code is highlighted (inline styles: no stylesheet to fetch)
    assert "http://" not in page and "https://" not in page


def test_drop_reasons_follow_the_filters():
    base = {"n_tool_images": 1, "vision_ok": True, "end_reason": "DONE", "acc": 1.0, "advantage": 0.0}
    summaries = [
        {**base, "group_id": "a", "reward": 1.0},
        {**base, "group_id": "a", "reward": 1.0},  # group a ties: zero_std
        {**base, "group_id": "b", "reward": 1.0},  # trained
        {**base, "group_id": "b", "reward": 0.0, "n_tool_images": 0},  # filtered: no tool image
        {**base, "group_id": "b", "reward": 0.5},  # survived the filters, cut by the ranking
        {**base, "group_id": "b", "reward": 0.0, "end_reason": "OVER_LENGTH"},
        {**base, "group_id": "b", "reward": 0.0, "end_reason": "SANDBOX_ERROR"},
    ]
    trajs = [
        Trajectory(task_id=str(i), group_id=s["group_id"], prompt_ids=[1]) for i, s in enumerate(summaries)
    ]
    items = items_from_summaries(trajs, summaries, trained={2})
    assert [(i.accepted, i.reason) for i in items] == [
        (False, "zero_std"),
        (False, "zero_std"),
        (True, ""),
        (False, "no_tool_image"),
        (False, "ranked_out"),
        (False, "end_reason"),
        (False, "sandbox_error"),
    ]
    assert items[4].traj.reward == 0.5  # scores come from the summaries
    assert all(i.accepted for i in items_from_summaries(trajs, summaries, trained=None))  # an eval page


# ------------------------------------------------------------------------------------- the browser
class Chromium:
    """Headless Chromium driven over the DevTools protocol (aiohttp's websocket client)."""

    def __init__(self, profile: Path):
        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                *CHROME_FLAGS,
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in self.proc.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                self.ws_url = m.group(1)
                break
        else:
            raise RuntimeError(f"chromium did not start (rc {self.proc.wait()})")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)

    async def session(self, url: str, actions):
        import aiohttp

        async with aiohttp.ClientSession() as http, http.ws_connect(self.ws_url, max_msg_size=0) as ws:
            seq, events = 0, []

            async def call(method: str, sid: str | None = None, **params):
                nonlocal seq
                seq += 1
                msg = {"id": seq, "method": method, "params": params, **({"sessionId": sid} if sid else {})}
                await ws.send_str(json.dumps(msg))
                while True:
                    data = json.loads((await ws.receive(timeout=60)).data)
                    if data.get("id") == seq:
                        if "error" in data:
                            raise RuntimeError(f"{method}: {data['error']}")
                        return data["result"]
                    events.append(data)

            target = (await call("Target.createTarget", url="about:blank"))["targetId"]
            sid = (await call("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
            for domain in ("Page", "Network", "Runtime"):
                await call(f"{domain}.enable", sid)
            await call("Page.navigate", sid, url=url)
            while not any(e.get("method") == "Page.loadEventFired" for e in events):
                events.append(json.loads((await ws.receive(timeout=60)).data))

            async def js(expr: str):
                r = await call(
                    "Runtime.evaluate", sid, expression=expr, returnByValue=True, awaitPromise=True
                )
                if "exceptionDetails" in r:
                    raise AssertionError(f"{expr}: {r['exceptionDetails']}")
                return r["result"].get("value")

            async def screenshot() -> bytes:
                return base64.b64decode((await call("Page.captureScreenshot", sid, format="png"))["data"])

            out = await actions(js, screenshot)
            requests = [
                e["params"]["request"]["url"]
                for e in events
                if e.get("method") == "Network.requestWillBeSent"
            ]
            return out, requests


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir, ray_local):
    """A real 2-step tiny run (Ray, rollout worker, sandbox, reward service, learner) with a viewer page
    every step and one per eval."""
    from pyvision_rl.config import load_config
    from pyvision_rl.trainer import Trainer

    out = tmp_path_factory.mktemp("viewer-run")
    cfg = load_config(
        REPO / "configs/tiny_cpu.yaml",
        tiny_overrides(out, tiny_model_dir, steps=2)
        + ["trainer.eval_every=2", "eval.max_tasks=4", "eval.max_turns=2"]
        + ["logging.rollouts_every=1", "logging.rollouts_per_step=2"],
    )
    tr = Trainer(cfg)
    try:
        tr.fit()
    finally:
        tr.shutdown()
    return cfg


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make sysdeps installs it)")
def test_a_real_run_page_in_headless_chromium(tiny_run, tmp_path):
    rollouts = tiny_run.run_dir() / "rollouts"
    assert {p.name for p in rollouts.glob("*.html")} == {
        "index.html",
        "eval_step_0.html",
        "step_1.html",
        "step_2.html",
        "eval_step_2.html",
    }
    index = json.loads((rollouts / "index.json").read_text())
    assert [e["name"] for e in index] == ["eval_step_0", "step_1", "eval_step_2", "step_2"]  # written order
    page = (rollouts / "step_2.html").read_text()
    # Ground truth from the HTML itself (not from the page's JS): per card, accepted / reason / correct.
    cards = re.findall(
        r'<article class="card" id="t\d+" data-accepted="(\d)" data-reason="([^"]*)" data-correct="(\d)"',
        page,
    )
    assert len(cards) == 2 * 4  # logging.rollouts_per_step groups x rollout.n
    n_images = page.count("<img ")
    assert n_images >= len(cards)  # at least every input image
    reasons = sorted({r for a, r, _ in cards if a == "0"})

    async def actions(js, screenshot):
        got = {"cards": await js("document.querySelectorAll('.card').length")}
        got["images"] = await js(
            "Promise.all([...document.images].map(i => i.decode().then(() => [i.naturalWidth, i.naturalHeight])))"
        )
        got["filters"] = {}
        for status in ["accepted", "filtered", *[f"reason:{r}" for r in reasons]]:
            for correct in ("all", "correct", "wrong"):
                got["filters"][status, correct] = await js(
                    f"(() => {{ const s = document.getElementById('f-status'), c = document.getElementById('f-correct');"
                    f"s.value = {json.dumps(status)}; c.value = {json.dumps(correct)};"
                    "s.dispatchEvent(new Event('change')); c.dispatchEvent(new Event('change'));"
                    "const vis = [...document.querySelectorAll('.card')].filter(e => getComputedStyle(e).display !== 'none');"
                    "return [vis.length, +document.getElementById('shown').textContent]; })()"
                )
        await js(
            "(() => { for (const id of ['f-status', 'f-correct']) { const s = document.getElementById(id);"
            "s.value = 'all'; s.dispatchEvent(new Event('change')); } })()"
        )
        got["png"] = await screenshot()
        return got

    browser = Chromium(tmp_path / "profile")
    try:
        got, requests = asyncio.run(browser.session((rollouts / "step_2.html").as_uri(), actions))
    finally:
        browser.close()
    assert got["cards"] == len(cards)
    assert len(got["images"]) == n_images and all(w > 0 and h > 0 for w, h in got["images"])
    for (status, correct), (visible, shown) in got["filters"].items():
        want = sum(
            1
            for a, r, c in cards
            if (status == "accepted" and a == "1")
            or (status == "filtered" and a == "0")
            or (status == f"reason:{r}" and a == "0")
            if correct == "all" or (c == "1") == (correct == "correct")
        )
        assert visible == shown == want, (status, correct, visible, shown, want)
    assert all(u.startswith(("file:", "data:")) for u in requests), requests  # no network
    png = got["png"]
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    (tmp_path / "viewer.png").write_bytes(png)
    if os.environ.get("PYVISION_VIEWER_SCREENSHOT"):  # how docs/viewer.png is made
        Path(os.environ["PYVISION_VIEWER_SCREENSHOT"]).write_bytes(png)


def test_index_lists_every_page(tmp_path, tiny_model_dir):
    from pyvision_rl.models import load_processor

    t = _traj(load_processor(tiny_model_dir).tokenizer, with_figure=False)
    decode = tokenizer_decoder(tiny_model_dir)
    write_rollout_page(tmp_path, "step_5", [ViewItem(t, True)], decode, "step 5")
    write_rollout_page(tmp_path, "eval_step_5", [ViewItem(t, False, "zero_std")] * 2, decode, "eval 5")
    write_rollout_page(tmp_path, "step_5", [ViewItem(t, True)] * 3, decode, "step 5 again")  # rewritten
    index = json.loads((tmp_path / "index.json").read_text())
    assert [(e["name"], e["trajectories"], e["accepted"]) for e in index] == [
        ("eval_step_5", 2, 0),
        ("step_5", 3, 3),
    ]
    html = (tmp_path / "index.html").read_text()
    assert 'href="step_5.html"' in html and 'href="eval_step_5.html"' in html


def test_the_sample_goes_to_a_wandb_table_with_images(tmp_path, tiny_model_dir, monkeypatch):
    from pyvision_rl.config import load_config
    from pyvision_rl.metrics import MetricsLogger
    from pyvision_rl.models import load_processor
    from pyvision_rl.viewer import table_rows

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    t = _traj(load_processor(tiny_model_dir).tokenizer)
    rows = table_rows([ViewItem(t, True), ViewItem(t, False, "zero_std")], tokenizer_decoder(tiny_model_dir))
    assert rows[1]["status"] == "filtered: zero_std" and rows[0]["image"] == t.images[0].png
    assert "<code>" in rows[0]["turns"] and "<|image_pad|>" not in rows[0]["turns"]
    logger = MetricsLogger(tmp_path, load_config(None, ["logging.wandb=offline"]))
    assert logger._wandb is not None
    logger.log_rollouts(1, rows, key="rollouts/step")
    logger.close()
    (table,) = tmp_path.glob("wandb/offline-run-*/files/media/table/rollouts/step_*.table.json")
    data = json.loads(table.read_text())
    assert len(data["data"]) == 2
    col = data["columns"].index("image")
    assert all(row[col] not in (None, "") for row in data["data"])  # a wandb Image per row
