"""The pairwise LLM judge, end to end against a real HTTP server on 127.0.0.1 that speaks the
chat-completions protocol (scripted per test), through the real `openai` client."""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("openai")

from dualign.errors import InputError  # noqa: E402
from dualign.eval.judge import (  # noqa: E402
    JudgeConfig, JudgeRequestError, MinIntervalLimiter, backoff_delay, combine_orders, judge_messages,
    judge_pairwise, parse_verdict, request_key, summarize_outcomes,
)

UNSET_KEY_ENV = "DUALIGN_TEST_JUDGE_KEY_UNSET"


# --------------------------------------------------------------------------- the fake endpoint

@dataclass
class Call:
    """One request the fake endpoint received, with the judge prompt's parts parsed back out."""

    criterion: str
    prompt: str
    first: str
    second: str
    auth: str
    body: dict

    @property
    def key(self) -> tuple:
        return (self.criterion, self.prompt, self.first, self.second)


def _between(text: str, tag: str) -> str:
    m = re.search(rf"<{tag}>\n(.*?)\n</{tag}>", text, re.S)
    return m.group(1) if m else ""


def prefer_longer(call: Call) -> str:
    """A judge with a deterministic taste: the longer response is better (equal: tie)."""
    if len(call.first) == len(call.second):
        return "Both are alike.\nVerdict: tie"
    best = 1 if len(call.first) > len(call.second) else 2
    return f"Response {best} is more complete.\n**Verdict:** {best}"


class FakeJudgeServer:
    """`POST /v1/chat/completions` on 127.0.0.1, port chosen by the OS.

    `judge(call) -> str` writes the reply; `fail(call, attempt, n_total) -> int | None` returns an
    HTTP status to fail the request with (attempt: 1-based count of this exact request,
    n_total: 1-based count of all requests).
    """

    def __init__(self):
        self.calls: list[Call] = []
        self.attempts: Counter = Counter()
        self.judge = prefer_longer
        self.fail = lambda call, attempt, n_total: None
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "not found", "type": "not_found"}})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][-1]["content"]
                criterion = "harmlessness" if "Harmlessness:" in user else "helpfulness"
                call = Call(criterion, _between(user, "user_prompt"), _between(user, "response_1"),
                            _between(user, "response_2"), self.headers.get("Authorization", ""), body)
                with outer.lock:
                    outer.calls.append(call)
                    outer.attempts[call.key] += 1
                    status = outer.fail(call, outer.attempts[call.key], len(outer.calls))
                if status is not None:
                    return self._send(status, {"error": {"message": f"scripted failure {status}",
                                                         "type": "server_error", "code": None}})
                self._send(200, {
                    "id": f"chatcmpl-{len(outer.calls)}", "object": "chat.completion", "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": outer.judge(call)}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # loopback must never go through a proxy
    monkeypatch.delenv(UNSET_KEY_ENV, raising=False)
    srv = FakeJudgeServer()
    yield srv
    srv.close()


@pytest.fixture
def make_config(server, tmp_path):
    def make(**kw):
        base = dict(model="fake-judge", base_url=server.url, api_key_env=UNSET_KEY_ENV, max_requests_per_second=1000,
                    max_concurrency=2, max_retries=3, backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=5,
                    cache_dir=str(tmp_path / "judge-cache"))
        base.update(kw)
        return JudgeConfig(**base)
    return make


def run(config, prompts, a, b, **kw):
    logs = []
    results = judge_pairwise(prompts, a, b, config, progress=False, log=logs.append, **kw)
    return results, logs


PROMPTS = [f"question {i}" for i in range(6)]
LONG = [f"a long and detailed answer to question {i}" for i in range(6)]
SHORT = [f"short {i}" for i in range(6)]


# --------------------------------------------------------------------------- pure functions

@pytest.mark.parametrize("reply, verdict", [
    ("Verdict: 1", "1"),
    ("Response 2 explains more.\nVerdict: 2", "2"),
    ("**Verdict:** 2", "2"),
    ("Verdict: Response 1", "1"),
    ("verdict - 2.", "2"),
    ("Final verdict: [[tie]]", "tie"),
    ("VERDICT: TIE", "tie"),
    ("Verdict: draw", "tie"),
    ("## Verdict: 1\n", "1"),
    ("Verdict: 1\nOn reflection...\nVerdict: 2", "2"),  # the last verdict line counts
    ("2", "2"),
    (" tie. ", "tie"),
    ("Verdict: 12", None),
    ("Verdict: both are bad", None),
    ("Response 1 is better.", None),
    ("I think 1 is better\n2 is worse", None),
    ("My verdict is pending", None),
    ("", None),
    (None, None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize("ab, ba, outcome", [
    ("1", "2", "win"), ("1", "tie", "win"), ("tie", "2", "win"),
    ("2", "1", "loss"), ("2", "tie", "loss"), ("tie", "1", "loss"),
    ("1", "1", "tie"), ("2", "2", "tie"), ("tie", "tie", "tie"),
    (None, "2", None), ("1", None, None),
])
def test_combine_orders(ab, ba, outcome):
    assert combine_orders(ab, ba) == outcome


def test_summary_bootstrap_is_seeded_and_brackets_the_rate():
    outcomes = ["win"] * 6 + ["tie"] * 2 + ["loss"] * 2 + [None]
    r1 = summarize_outcomes("helpfulness", outcomes, 1, seed=3)
    r2 = summarize_outcomes("helpfulness", outcomes, 1, seed=3)
    assert r1.to_json() == r2.to_json()
    assert (r1.win_rate, r1.tie_rate, r1.loss_rate) == (0.6, 0.2, 0.2)
    assert r1.win_rate_ci[0] < 0.6 < r1.win_rate_ci[1]
    assert r1.n_prompts == 11 and r1.n_scored == 10 and r1.unparseable_prompts == [10]
    empty = summarize_outcomes("harmlessness", [None, None], 4).to_json()
    assert empty["win_rate"] is None and empty["win_rate_ci"] == [None, None] and empty["n_unparseable"] == 4
    json.dumps(empty, allow_nan=False)


def test_request_key_depends_on_what_determines_the_reply():
    cfg = JudgeConfig(model="m", base_url="http://127.0.0.1:1/v1")
    msgs = judge_messages("helpfulness", "p", "x", "y")
    k = request_key(cfg, msgs)
    assert re.fullmatch(r"[0-9a-f]{64}", k)
    assert request_key(JudgeConfig(model="m", base_url="http://127.0.0.1:1/v1/"), msgs) == k
    assert request_key(cfg, judge_messages("helpfulness", "p", "y", "x")) != k
    assert request_key(JudgeConfig(model="m2", base_url="http://127.0.0.1:1/v1"), msgs) != k
    assert request_key(JudgeConfig(model="m", base_url="http://127.0.0.1:1/v1", temperature=0.5), msgs) != k


def test_rate_limiter_spaces_request_starts():
    now, sleeps = [0.0], []

    def sleep(s):
        sleeps.append(round(s, 9))
        now[0] += s

    lim = MinIntervalLimiter(10, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        lim.wait()
    assert sleeps == [0.1, 0.1]
    now[0] += 5  # idle time is not banked into a burst beyond one request
    lim.wait()
    lim.wait()
    assert sleeps == [0.1, 0.1, 0.1]


def test_backoff_grows_is_capped_and_honours_retry_after():
    import random

    cfg = JudgeConfig(model="m", base_url="http://localhost/v1", backoff_base_s=1, backoff_max_s=10)
    rng = random.Random(0)
    assert 0.5 <= backoff_delay(0, cfg, rng) <= 1
    assert 4 <= backoff_delay(3, cfg, rng) <= 8
    assert 5 <= backoff_delay(10, cfg, rng) <= 10
    assert backoff_delay(0, cfg, rng, retry_after=7) == 7
    assert backoff_delay(0, cfg, rng, retry_after=100) == 10


# --------------------------------------------------------------------------- end to end

def test_both_orders_are_asked_and_position_bias_gives_ties(server, make_config):
    server.judge = lambda call: "The first one.\nVerdict: 1"
    results, _ = run(make_config(), PROMPTS[:4], LONG[:4], SHORT[:4])
    assert len(server.calls) == 4 * 2 * 2
    seen = Counter((c.criterion, c.prompt, c.first, c.second) for c in server.calls)
    for crit in ("helpfulness", "harmlessness"):
        for p, a, b in zip(PROMPTS[:4], LONG[:4], SHORT[:4]):
            assert seen[(crit, p, a, b)] == 1 and seen[(crit, p, b, a)] == 1
        r = results[crit]
        assert (r.win_rate, r.tie_rate, r.loss_rate) == (0.0, 1.0, 0.0)
        assert r.n_scored == 4 and r.n_unparseable == 0
    # A local endpoint without a key variable gets a dummy key, and temperature 0 is sent.
    assert all(c.auth.startswith("Bearer ") for c in server.calls)
    assert all(c.body["temperature"] == 0 and c.body["model"] == "fake-judge" for c in server.calls)


def test_a_preferred_judge_wins_and_unparseable_replies_are_counted_not_scored(server, make_config):
    def judge(call):
        if call.prompt == "question 4":
            return "I cannot decide."  # both orders unparseable
        if call.prompt == "question 5" and call.first.startswith("short"):
            return "Verdict: maybe"  # one order unparseable: the prompt is still left out
        return prefer_longer(call)

    server.judge = judge
    results, logs = run(make_config(), PROMPTS, LONG, SHORT, seed=1)
    for crit, r in results.items():
        assert (r.win_rate, r.tie_rate, r.loss_rate) == (1.0, 0.0, 0.0)
        assert r.win_rate_ci == [1.0, 1.0] and r.loss_rate_ci == [0.0, 0.0]
        assert r.n_prompts == 6 and r.n_scored == 4 and r.n_win == 4
        assert r.n_unparseable == 3 and r.unparseable_prompts == [4, 5]
        assert r.outcomes == ["win"] * 4 + [None, None]
        out = r.to_json()
        assert out["n_unparseable"] == 3 and out["criterion"] == crit and "outcomes" not in out
        json.dumps(out, allow_nan=False)
    assert any("3 unparseable replies" in line for line in logs)
    # B's side: the reference judged against itself ties; swapped roles lose.
    swapped, _ = run(make_config(), PROMPTS[:4], SHORT[:4], LONG[:4])
    assert swapped["helpfulness"].loss_rate == 1.0


def test_mixed_outcomes_have_a_ci_around_the_rate(server, make_config):
    a = [LONG[i] if i % 3 else SHORT[i] for i in range(6)]  # A longer on 4 prompts, shorter on 2
    b = [SHORT[i] if i % 3 else LONG[i] for i in range(6)]
    r = run(make_config(), PROMPTS, a, b, criteria=("helpfulness",))[0]["helpfulness"]
    assert r.win_rate == pytest.approx(4 / 6) and r.loss_rate == pytest.approx(2 / 6)
    assert 0 <= r.win_rate_ci[0] < r.win_rate < r.win_rate_ci[1] <= 1


def test_second_run_is_served_from_the_cache(server, make_config):
    cfg = make_config()
    first, _ = run(cfg, PROMPTS, LONG, SHORT)
    n_first = len(server.calls)
    assert n_first == 6 * 2 * 2
    assert len(list((cfg.cache_path()).glob("*.json"))) == n_first
    second, logs = run(cfg, PROMPTS, LONG, SHORT)
    assert len(server.calls) == n_first  # zero HTTP requests
    assert {k: v.to_json() for k, v in second.items()} == {k: v.to_json() for k, v in first.items()}
    assert any(f"{n_first} cached, 0 to send" in line for line in logs)


def test_duplicate_requests_are_sent_once(server, make_config):
    run(make_config(), ["same"] * 3, ["long answer"] * 3, ["short"] * 3, criteria=("helpfulness",))
    assert len(server.calls) == 2


@pytest.mark.parametrize("status", [429, 500])
def test_a_failed_first_attempt_is_retried(server, make_config, status):
    server.fail = lambda call, attempt, n_total: status if attempt == 1 else None
    results, logs = run(make_config(), PROMPTS[:2], LONG[:2], SHORT[:2])
    assert len(server.calls) == 2 * (2 * 2 * 2)  # every request: one failure, one success
    assert results["helpfulness"].win_rate == 1.0 and results["harmlessness"].n_scored == 2
    assert sum(f"HTTP {status}; retry 1/3" in line for line in logs) == 8


def test_retries_are_bounded_and_client_errors_are_not_retried(server, make_config):
    server.fail = lambda call, attempt, n_total: 503
    with pytest.raises(JudgeRequestError, match="after 2 retries: HTTP 503"):
        run(make_config(max_retries=2, max_concurrency=1), PROMPTS[:1], LONG[:1], SHORT[:1])
    assert len(server.calls) == 3
    server.fail = lambda call, attempt, n_total: 401
    with pytest.raises(JudgeRequestError, match="HTTP 401"):
        run(make_config(max_concurrency=1), PROMPTS[:1], LONG[:1], SHORT[:1])
    assert len(server.calls) == 4


def test_an_interrupted_run_resumes_paying_only_for_missing_replies(server, make_config):
    cfg = make_config(max_retries=1, max_concurrency=1)
    server.fail = lambda call, attempt, n_total: 500 if n_total > 7 else None  # dies after 7 answers
    with pytest.raises(JudgeRequestError, match="7 of 24 replies received and cached"):
        run(cfg, PROMPTS, LONG, SHORT)
    cached = len(list(cfg.cache_path().glob("*.json")))
    assert cached == 7
    before = len(server.calls)
    server.fail = lambda call, attempt, n_total: None
    results, logs = run(cfg, PROMPTS, LONG, SHORT)
    assert len(server.calls) - before == 6 * 2 * 2 - cached
    assert any(f"{cached} cached, {24 - cached} to send" in line for line in logs)
    assert results["harmlessness"].win_rate == 1.0 and results["harmlessness"].n_scored == 6


def test_a_damaged_cache_file_is_requested_again(server, make_config):
    cfg = make_config()
    run(cfg, PROMPTS[:1], LONG[:1], SHORT[:1], criteria=("helpfulness",))
    victim = sorted(cfg.cache_path().glob("*.json"))[0]
    victim.write_text("{not json")
    results, _ = run(cfg, PROMPTS[:1], LONG[:1], SHORT[:1], criteria=("helpfulness",))
    assert len(server.calls) == 3 and results["helpfulness"].win_rate == 1.0
    assert json.loads(victim.read_text())["reply"]


def test_missing_api_key_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(UNSET_KEY_ENV, raising=False)
    cfg = JudgeConfig(model="gpt-4o", base_url="https://judge.invalid/v1", api_key_env=UNSET_KEY_ENV,
                      cache_dir=str(tmp_path))
    with pytest.raises(InputError, match=UNSET_KEY_ENV):
        cfg.api_key()
    with pytest.raises(InputError, match=UNSET_KEY_ENV):
        judge_pairwise(["p"], ["a"], ["b"], cfg, progress=False, log=lambda m: None)
    monkeypatch.setenv(UNSET_KEY_ENV, "sk-test")
    assert cfg.api_key() == "sk-test"
    for local in ("http://localhost:8080/v1", "http://127.0.0.2:1/v1", "http://[::1]:9/v1"):
        monkeypatch.delenv(UNSET_KEY_ENV)
        assert JudgeConfig(model="m", base_url=local, api_key_env=UNSET_KEY_ENV).api_key()
        monkeypatch.setenv(UNSET_KEY_ENV, "x")


def test_the_key_is_sent_when_set(server, make_config, monkeypatch):
    monkeypatch.setenv(UNSET_KEY_ENV, "sk-local-secret")
    run(make_config(), PROMPTS[:1], LONG[:1], SHORT[:1], criteria=("helpfulness",))
    assert {c.auth for c in server.calls} == {"Bearer sk-local-secret"}


@pytest.mark.parametrize("field, value", [
    ("model", ""), ("base_url", "ftp://host/v1"), ("base_url", "localhost:8000"), ("api_key_env", "1BAD"),
    ("api_key_env", ""), ("max_requests_per_second", 0), ("max_concurrency", 0), ("max_retries", -1),
    ("max_retries", 1.5), ("backoff_base_s", -1), ("timeout_s", 0), ("temperature", -0.1),
    ("temperature", float("nan")), ("max_tokens", 0),
])
def test_bad_config_values_raise_input_error_naming_the_field(field, value):
    kw = {"model": "m", "base_url": "http://localhost:8000/v1", field: value}
    with pytest.raises(InputError, match=field):
        JudgeConfig(**kw)


def test_bad_inputs_raise_input_error(tmp_path):
    cfg = JudgeConfig(model="m", base_url="http://localhost:1/v1", cache_dir=str(tmp_path))
    with pytest.raises(InputError, match="differ in length"):
        judge_pairwise(["p", "q"], ["a"], ["b", "c"], cfg, log=lambda m: None)
    with pytest.raises(InputError, match="no prompts"):
        judge_pairwise([], [], [], cfg, log=lambda m: None)
    with pytest.raises(InputError, match="unknown judge criterion"):
        judge_pairwise(["p"], ["a"], ["b"], cfg, criteria=("honesty",), log=lambda m: None)
    with pytest.raises(InputError, match="responses_b"):
        judge_pairwise(["p"], ["a"], [None], cfg, log=lambda m: None)


# --------------------------------------------------------------------------- a real local server (optional)

@pytest.mark.integration
def test_llama_server_as_judge(tmp_path, monkeypatch):
    """The protocol against llama.cpp's `llama-server` with the embedded SmolLM2 GGUF, when both are
    installed. A 135M model is a poor judge: this checks the plumbing, not the verdicts."""
    binary = shutil.which("llama-server")
    if binary is None:
        pytest.skip("llama-server is not installed")
    from dualign.models.loading import embedded_gguf_path

    try:
        gguf = embedded_gguf_path()
    except InputError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-c", "2048"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        cfg = JudgeConfig(model="smollm2", base_url=f"http://127.0.0.1:{port}/v1", api_key_env=UNSET_KEY_ENV,
                          max_tokens=64, max_retries=10, backoff_base_s=1, timeout_s=120, cache_dir=str(tmp_path))
        results = judge_pairwise(["How do I boil an egg?"], ["Put it in boiling water for 8 minutes."], ["No."],
                                 cfg, progress=False, log=lambda m: None)
        r = results["helpfulness"]
        assert r.n_prompts == 1 and r.n_scored + len(r.unparseable_prompts) == 1
        assert len(list(tmp_path.glob("*.json"))) == 4
    finally:
        proc.terminate()
        proc.wait(timeout=10)
