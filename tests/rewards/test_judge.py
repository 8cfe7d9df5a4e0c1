"""The LLM judge: the release's reply parsing, and the HTTP backend against a real OpenAI-style server on
loopback (http.server in a thread): request shape, API key, batching, retries, timeouts, failures."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pyvision_rl.config import JudgeConfig, RewardConfig
from pyvision_rl.rewards import HTTPJudge, parse_judgement, score_batch
from pyvision_rl.rewards.judge import judge_prompt
from pyvision_rl.types import EndReason, Trajectory


def test_parse_judgement_as_the_release():
    assert parse_judgement("Judgement: 1") == 1.0
    assert parse_judgement(" 0 ") == 0.0
    assert parse_judgement("1") == 1.0
    assert parse_judgement("The answers differ.\nJudgement: 0") == 0.0
    assert parse_judgement("Judgement: 1 (same colour)") == 1.0
    assert parse_judgement("Judgement: yes") is None
    assert (
        parse_judgement("correct") is None and parse_judgement("") is None and parse_judgement(None) is None
    )


def test_prompt_ends_with_the_case_to_judge():
    p = judge_prompt("What colour?", "Red", "red")
    assert p.endswith("[Question]: What colour?\n[Reference]: red\n[Answer]: Red\nJudgement:")
    assert p.count("Judgement:") > 3  # few-shot


class _Server:
    """An OpenAI chat-completions endpoint: judges "1" when the [Answer] equals the [Reference] (case
    folded). `script` holds per-request overrides consumed in order: an HTTP status, "garbage", or "sleep"."""

    def __init__(self):
        self.requests, self.script, self.lock = [], [], threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append((self.path, dict(self.headers), body))
                    action = outer.script.pop(0) if outer.script else None
                if isinstance(action, int):
                    self.send_response(action)
                    self.end_headers()
                    return
                if action == "sleep":
                    time.sleep(1.5)
                prompt = body["messages"][-1]["content"]
                case = prompt.rsplit("[Question]:", 1)[1]
                ref = case.split("[Reference]: ")[1].split("\n")[0]
                ans = case.split("[Answer]: ")[1].split("\n")[0]
                reply = "no idea" if action == "garbage" else f"Judgement: {int(ref.lower() == ans.lower())}"
                out = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def test_http_judge_batches_with_the_openai_api_and_key(server, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", "sekrit")
    cfg = JudgeConfig(
        backend="http", base_url=server.url + "/", model="qwen-judge", api_key_env="JUDGE_KEY_FOR_TEST"
    )
    items = [
        ("Colour?", "Red", "red", "vstar"),
        ("Count?", "3", "4", "chart"),
        ("Side?", "left", "Left", "vsi"),
    ]
    assert HTTPJudge(cfg).judge_many(items) == [1.0, 0.0, 1.0]
    assert len(server.requests) == 3
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sekrit"
    assert body["model"] == "qwen-judge" and body["temperature"] == 0.3
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert HTTPJudge(cfg).judge_many([]) == []


def test_http_judge_retries_then_gives_up_per_request(server):
    cfg = JudgeConfig(backend="http", base_url=server.url, model="m", retries=2, timeout_s=0.5, concurrency=1)
    judge = HTTPJudge(cfg)
    server.script = [500, "garbage"]  # two failures, then an answer: retried
    assert judge.judge_many([("q", "a", "a", "vstar")]) == [1.0]
    assert len(server.requests) == 3
    server.script = [503, 503, 503]  # every attempt fails: None for that item only
    assert judge.judge_many([("q", "a", "a", "vstar"), ("q", "a", "b", "vstar")]) == [None, 0.0]
    server.script = ["sleep", "sleep", "sleep"]  # past the timeout on every attempt
    assert judge.judge_many([("q", "a", "a", "vstar")]) == [None]


def test_unreachable_judge_costs_the_scores_not_the_run():
    cfg = RewardConfig(judge=JudgeConfig(backend="http", base_url="http://127.0.0.1:9", model="m", retries=1))
    t = Trajectory(
        task_id="t",
        group_id="g",
        prompt_ids=[1],
        end_reason=EndReason.DONE,
        data_source="vstar",
        ground_truth="red",
        n_tool_calls=1,
        response_text="<answer>\n\\boxed{red}\n</answer>",
    )
    assert score_batch([t], cfg, HTTPJudge(cfg.judge)) == {"judged": 1, "judge_failures": 1}
    assert t.acc == 0.0 and t.reward == 0.0 and t.extra["judge_failed"]


def test_http_config_is_checked():
    with pytest.raises(ValueError, match="base_url"):
        HTTPJudge(JudgeConfig(backend="http"))
