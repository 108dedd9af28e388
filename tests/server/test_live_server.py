"""`scripts/serve.py` for real: a subprocess on a free loopback port serving the demo checkpoint,
driven by the official ``openai`` client, curl (the README's command), raw httpx streams and
the benchmark of ``scripts/benchmark.py`` (``dsv4_jax.bench.serving``); SIGTERM last. One server
per module (its JIT warm-up is the cost).

Server settings keep the compiled shapes few: batch ≤ 2, prefill chunks ≤ 16 tokens (so the
buckets are 8 and 16), a 4096-token context; the warm-up compiles those before /health is 200.
MTP speculative decoding runs at 2 drafts a step (``--speculative-tokens 2``, below the chat
profile's 3), so /metrics and the benchmark report its acceptance.
"""

import contextlib
import gzip
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from dsv4_jax.bench import serving as bench

ROOT = pathlib.Path(__file__).resolve().parents[2]
KEY = "test-key"
MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    def __init__(self, proc, port, tmp, log):
        self.proc, self.port, self.tmp, self.log = proc, port, tmp, log
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def metric(self, name) -> float:
        for line in self.metrics().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    port = free_port()
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "serve.py"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        KEY,
        "--profile",
        "chat",
        "--max-batch",
        "2",
        "--max-model-len",
        "4096",
        "--max-tokens-per-step",
        "16",
        "--num-snapshots",
        "4",
        "--speculative-tokens",
        "2",
        "--warmup-max-batch",
        "2",
        "--warmup-max-prefill",
        "16",
        "--compile-cache",
        str(tmp / "xla"),
        "--shutdown-timeout",
        "3",
        "--profile-dir",
        str(tmp / "trace"),
        "--profile-steps",
        "3",
    ]
    with running(cmd, port, tmp, 300) as proc:
        yield Live(proc, port, tmp, tmp / "server.log")


@contextlib.contextmanager
def running(cmd: list[str], port: int, tmp, wait_s: float):
    """``cmd`` (a ``scripts/serve.py`` command line on ``port``) running until /health is 200,
    its log in ``tmp/server.log``; killed on exit if still alive."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # conftest's XLA_FLAGS (cheaper CPU compiles) carry over
    with open(tmp / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"server exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"server not healthy after {wait_s} s:\n" + (tmp / "server.log").read_text()[-3000:]
                )
            time.sleep(0.5)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_models_and_api_key(live):
    assert [m.id for m in live.client.models.list().data] == ["demo"]
    bad = openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="demo", prompt="hi", max_tokens=2)
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}


def test_openai_client_completions(live, tok):
    c = live.client
    kw = {"model": "demo", "max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}
    r = c.completions.create(prompt="The capital of France is", **kw)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    ids = tok.encode("The capital of France is").ids
    assert r.usage.prompt_tokens == len(ids)
    by_ids = c.completions.create(prompt=ids, **kw)  # a list of token ids, as OpenAI's API allows
    assert by_ids.choices[0].text == r.choices[0].text  # greedy: the same prompt gives the same text
    chunks = list(c.completions.create(prompt=ids, stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].choices[0].finish_reason == "length"


def test_openai_client_chat(live, tok):
    from dsv4_jax.server.encoding import render

    c = live.client
    kw = {
        "model": "demo",
        "messages": MSGS,
        "max_tokens": 8,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    r = c.chat.completions.create(**kw)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode(render(MSGS)).ids) and r.usage.completion_tokens == 8
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert (
        "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        == r.choices[0].message.content
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens
    think = c.chat.completions.create(
        model="demo",
        messages=MSGS,
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True, "chat_template_kwargs": {"thinking": True}},
    )
    msg = think.choices[0].message.model_dump()
    # The demo's random weights never close their thinking: all 8 tokens are reasoning.
    assert (
        msg["reasoning_content"]
        and msg["content"] == ""
        and think.usage.prompt_tokens == r.usage.prompt_tokens
    )


def test_openai_client_errors(live):
    c = live.client
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model="demo", prompt="x", max_tokens=-5)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        c.completions.create(model="demo", prompt=[5] * 4200, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=MSGS)
    r = httpx.post(
        live.url + "/v1/chat/completions", content=b"{oops", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert c.completions.create(model="demo", prompt="ok", max_tokens=2).usage.completion_tokens >= 1


def test_readme_curl_command(live):
    text = (ROOT / "README.md").read_text()
    block = re.search(
        r"```sh\n(curl http://127\.0\.0\.1:8000/v1/completions.*?)\n```", text, re.DOTALL
    ).group(1)
    cmd = block.replace("\\\n", " ").replace(":8000", f":{live.port}")
    out = subprocess.run(
        ["bash", "-c", cmd + f" -H 'Authorization: Bearer {KEY}'"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    body = json.loads(out.stdout)
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] >= 1


def test_client_disconnect_aborts_and_frees_the_slot(live):
    aborted = live.metric('dsv4_requests_total{finish_reason="abort"}')
    body = {
        "model": "demo",
        "prompt": "Tell me a long story",
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        live.url + "/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ) as r:
        n = 0
        for line in r.iter_lines():
            n += line.startswith("data: ")
            if n >= 3:
                break
    deadline = time.monotonic() + 30
    while live.metric('dsv4_requests_total{finish_reason="abort"}') < aborted + 1:
        assert time.monotonic() < deadline, "disconnect did not abort the request"
        time.sleep(0.2)
    time.sleep(0.3)
    assert live.metric("dsv4_num_requests_running") == 0
    text = live.metrics()
    assert (
        'dsv4_kv_usage_ratio{pool="slots"} 0.0' in text and 'dsv4_kv_usage_ratio{pool="blocks"} 0.0' in text
    )


def spec_metrics_are_sane(live):
    """After a greedy generation (drafts at 2 a step): the MTP series of /metrics agree."""
    kw = {"model": "demo", "max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}
    live.client.completions.create(prompt="def fib(n):", **kw)
    get = lambda name: live.metric("dsv4_spec_decode_" + name)
    drafted, accepted, steps = (
        get("num_draft_tokens_total"),
        get("num_accepted_tokens_total"),
        get("num_drafts_total"),
    )
    assert drafted > 0 and 0 <= accepted <= drafted and 0 < steps <= drafted <= 2 * steps
    assert abs(get("acceptance_rate") - accepted / drafted) < 1e-9
    assert abs(get("mean_acceptance_length") - (1 + accepted / steps)) < 1e-9
    per_pos = []
    for j in (1, 2):
        n = get(f'num_draft_tokens_per_pos_total{{position="{j}"}}')
        a = get(f'num_accepted_tokens_per_pos_total{{position="{j}"}}')
        assert (
            0 <= a <= n
            and abs(get(f'acceptance_rate_per_pos{{position="{j}"}}') - (a / n if n else 0)) < 1e-9
        )
        per_pos.append((n, a))
    assert per_pos[0][0] == steps and sum(n for n, _ in per_pos) == drafted
    assert sum(a for _, a in per_pos) == accepted and 'position="3"' not in live.metrics()


def test_metrics_and_profiler_trace(live):
    text = live.metrics()
    for name in (
        "dsv4_time_to_first_token_seconds_count",
        "dsv4_inter_token_latency_seconds_count",
        "dsv4_e2e_request_latency_seconds_count",
        "dsv4_generation_tokens_total",
    ):
        assert live.metric(name) > 0, name
    assert 'dsv4_kv_pool_bytes{pool="csa_index"}' in text and "dsv4_prefix_cache_hit_rate" in text
    spec_metrics_are_sane(live)
    deadline = time.monotonic() + 30
    while not list((live.tmp / "trace").glob("plugins/profile/*/perfetto_trace.json.gz")):
        assert time.monotonic() < deadline, "no trace written"
        time.sleep(0.5)
    run = next((live.tmp / "trace").glob("plugins/profile/*"))
    with gzip.open(next(run.glob("perfetto_trace.json.gz"))) as f:
        trace = f.read().decode()
    assert '"engine_step"' in trace and '"model_runner.execute"' in trace and '"scheduler.schedule"' in trace
    assert b"layer1_csa/attn" in next(run.glob("*.xplane.pb")).read_bytes()  # the model's named scopes


def test_benchmark_script_against_the_server(live, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = bench.parse_args(
        [
            "benchmark.py",
            "--base-url",
            live.url,
            "--api-key",
            KEY,
            "--num-prompts",
            "3",
            "--input-len",
            "12",
            "--output-len",
            "4",
            "--concurrency-sweep",
            "1,2",
            "--warmup-requests",
            "1",
            "--decode-sweep",
            "--decode-sweep-min",
            "64",
            "--decode-sweep-max",
            "128",
            "--decode-sweep-tokens",
            "4",
            "--no-progress",
            "--result-file",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert bench.run(args) == 0
    res = json.loads(out.read_text())
    assert [r["max_concurrency"] for r in res["runs"]] == [1, 2]
    for r in res["runs"]:
        assert r["completed"] == 3 and r["failed"] == 0 and r["total_output_tokens"] == 12
        assert r["total_input_tokens"] == 36 and r["ttft_ms"]["p50"] > 0
        assert r["prefix_hit_rate"] == 0.0  # 12-token prompts: shorter than one cache block
        # Read from /metrics: 3 requests of 4 tokens, each a prefill and drafts at 2 a step
        assert 0 < r["spec_verify_steps"] <= r["spec_draft_tokens"] <= 2 * r["spec_verify_steps"]
        assert 0 <= r["spec_accepted_tokens"] <= r["spec_draft_tokens"]
        assert r["spec_acceptance_rate"] == r["spec_accepted_tokens"] / r["spec_draft_tokens"]
        assert 1 <= r["spec_mean_acceptance_length"] <= 3
        assert len(r["spec_acceptance_rate_per_position"]) == 2
    rows = res["decode_sweep"]["default"]
    assert [x["context"] for x in rows] == [64, 128] and all(x["decode_ms_per_token"] > 0 for x in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigterm_drains_then_tells_the_rest_why(live):
    """Last: the short request in flight finishes, the long one is stopped with a reason, exit 0."""
    hdr = {"Authorization": f"Bearer {KEY}"}
    long_lines, short = [], {}

    def long_stream():
        body = {"model": "demo", "prompt": "x", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", live.url + "/v1/completions", json=body, headers=hdr, timeout=60) as r:
            long_lines.extend(r.iter_lines())

    def short_request():
        body = {"model": "demo", "prompt": "y", "max_tokens": 30, "ignore_eos": True}
        short["r"] = httpx.post(live.url + "/v1/completions", json=body, headers=hdr, timeout=60)

    def admitted_tokens():
        return live.metric("dsv4_prompt_tokens_total")

    def wait_admitted(before):
        deadline = time.monotonic() + 30
        while admitted_tokens() == before:
            assert time.monotonic() < deadline, "request not admitted"
            time.sleep(0.005)

    t1 = threading.Thread(target=long_stream)
    before = admitted_tokens()
    t1.start()
    wait_admitted(before)
    t2 = threading.Thread(target=short_request)
    before = admitted_tokens()
    t2.start()
    wait_admitted(before)  # both in the engine: SIGTERM now must let the short one finish
    live.proc.send_signal(signal.SIGTERM)
    t1.join(60)
    t2.join(60)
    assert live.proc.wait(30) == 0
    assert short["r"].status_code == 200 and short["r"].json()["choices"][0]["finish_reason"] == "length"
    datas = [x[6:] for x in long_lines if x.startswith("data: ")]
    assert datas[-1] == "[DONE]"
    errors = [json.loads(d)["error"] for d in datas[:-1] if "error" in json.loads(d)]
    assert errors and errors[0]["code"] == "server_shutting_down" and "shutting down" in errors[0]["message"]
    with pytest.raises(httpx.ConnectError):
        httpx.get(live.url + "/health", timeout=2)
