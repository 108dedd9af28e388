"""Replicas behind sglang-router (``scripts/replicas.py``, ``dsv4_jax/server/replicas.py``).

In-process first (FakeRunner engine): the routes the router reads from a worker
(``router_api.py``) and the SGLang fields it writes into every request it forwards. Then live:
two replicas of the demo behind the router's ``cache_aware`` policy, started by the launcher,
and two interleaved multi-turn chats through the router with the ``openai`` client. Which
replica served a turn is read from the replicas' own ``/metrics`` (prompt tokens before and
after the turn), never from the router. The router guarantees, and the test asserts: a new
conversation goes to the replica with the fewest requests in flight (the second one starts
while the first streams, so they land on different replicas); every later turn goes back to
the replica holding its prefix, where it hits the prefix cache. The turn order (a, b, a, a, b,
b, a, b) breaks round robin at a's third turn and random placement with probability 127/128;
a round-robin router over the same replicas is the control that shows the check can fail.
SIGTERM last: the launcher stops the router and drains the replicas, exits 0, leaves nothing.

Replica settings keep start-up cheap, as in test_live_server.py: the chat profile (128-token
blocks, so a 300-token conversation prefix is two cacheable blocks), prefill chunks of 8 tokens
(one bucket: ~7 s less warm-up than chunks of 16 on two cores, for ~0.1 s more per cold turn),
batch 2, warm-up of those shapes only, the suite's compile cache.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from server_fakes import fake_engine, make_client

from dsv4_jax.server import replicas

ROOT = pathlib.Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- in-process
def test_worker_routes(tok):
    client, state = make_client(fake_engine(tok), api_key="k")
    auth = {"Authorization": "Bearer k"}
    with client:
        assert client.get("/server_info").status_code == 401  # behind the key, like /v1/models
        lim = state.engine.engine.limits
        for path in ("/server_info", "/get_server_info"):
            info = client.get(path, headers=auth).json()
            assert info["served_model_name"] == "demo" and info["dp_size"] == 1
            assert info["max_running_requests"] == lim.num_slots
            assert info["max_total_num_tokens"] == lim.num_blocks * lim.block_tokens
        for path in ("/model_info", "/get_model_info"):
            info = client.get(path, headers=auth).json()
            assert info["is_generation"] is True and "model_path" not in info  # no tokenizer fetch
        assert client.get("/get_load", headers=auth).json() == [
            {"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}
        ]


def test_sglang_fields_the_router_adds(tok):
    """The body sglang-router 0.3.2 forwards for a chat request (observed), and the same fields
    asking for something this server does not do."""
    client, _ = make_client(fake_engine(tok))
    forwarded = {
        "messages": [{"role": "user", "content": "Hi"}],
        "model": "demo",
        "logprobs": False,
        "max_completion_tokens": 3,
        "stream": False,
        "temperature": 0.0,
        "no_stop_trim": False,
        "ignore_eos": False,
        "continue_final_message": False,
        "skip_special_tokens": True,
        "separate_reasoning": True,
        "stream_reasoning": True,
        "return_hidden_states": False,
    }
    completions = {"model": "demo", "prompt": "Hi", "max_tokens": 3, "stream": False, "echo": False,
                   "no_stop_trim": False, "ignore_eos": False, "skip_special_tokens": True,
                   "return_hidden_states": False}  # fmt: skip
    with client:
        assert client.post("/v1/chat/completions", json=forwarded).status_code == 200
        assert client.post("/v1/completions", json=completions).status_code == 200
        for name, value in (("no_stop_trim", True), ("separate_reasoning", False)):
            r = client.post("/v1/chat/completions", json={**forwarded, name: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == name


# ----------------------------------------------------------------------------- live
SYSTEM = {
    "a": "Answer as a river guide would. " + "Rivers carry water from the hills down to the sea. " * 13,
    "b": "Keep every reply short and plain. " + "Mountains rise slowly and wear away over ages. " * 11,
}
QUESTIONS = {
    "a": ["Name a river.", "How long is it?", "Where does it start?", "What lives in it?"],
    "b": ["Name a peak.", "How tall is it?", "Who climbed it first?", "Is it still growing?"],
}
ORDER = ["a", "a", "b", "b", "a", "b"]  # after the first turns of a and b, sent together
REPLICA_FLAGS = ["--profile", "chat", "--max-batch", "2", "--max-model-len", "1024",
                 "--max-tokens-per-step", "8", "--num-snapshots", "4", "--warmup-max-batch", "1",
                 "--warmup-max-prefill", "8", "--shutdown-timeout", "3"]  # fmt: skip


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free loopback ports."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n > 65535:
            continue
        try:
            socks = [socket.socket() for _ in range(n)]
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", first + i))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


class Fleet:
    def __init__(self, proc, port, replica_urls, tmp):
        self.proc, self.port, self.replica_urls, self.tmp = proc, port, replica_urls, tmp
        self.url = f"http://127.0.0.1:{port}"

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}:\n{p.read_text()[-2000:]}" for p in sorted(self.tmp.glob("*.log")))

    def counters(self) -> list[tuple[float, float]]:
        """Per replica: (prompt tokens admitted, prompt tokens served from the prefix cache)."""
        return [
            (metric(u, "dsv4_prompt_tokens_total"), metric(u, "dsv4_prefix_cache_hit_tokens_total"))
            for u in self.replica_urls
        ]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    port = free_ports(4)  # the router, its metrics, two replicas
    first = port + 2
    cmd = [sys.executable, str(ROOT / "scripts" / "replicas.py"), "--replicas", "2",
           "--port", str(port), "--replica-port", str(first), "--router-metrics-port", str(port + 1),
           "--log-dir", str(tmp), "--startup-timeout", "240", "--",
           *REPLICA_FLAGS, "--compile-cache", os.environ["JAX_COMPILATION_CACHE_DIR"]]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # conftest's XLA_FLAGS and compile cache carry over
    out = tmp / "launcher.out"
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    fleet = Fleet(proc, port, [f"http://127.0.0.1:{first + i}" for i in range(2)], tmp)
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while "dsv4-jax: router on" not in out.read_text():
            kids = children(proc.pid) or kids
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"launcher not ready (status {proc.poll()}):\n{out.read_text()}\n{fleet.logs()}")
            time.sleep(0.5)
        kids = children(proc.pid)
        yield fleet
    finally:  # whatever happened: no replica or router outlives the module
        kids = sorted(set(kids) | set(children(proc.pid)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for pid in kids:  # each child leads its own process group
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def chat(base_url: str, messages: list, stream_started: threading.Event | None = None) -> tuple[str, int]:
    """One greedy turn through the router: (the answer, its prompt tokens)."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    kw = {"model": "demo", "messages": messages, "temperature": 0}
    if stream_started is None:
        r = client.chat.completions.create(max_tokens=6, **kw)
        return r.choices[0].message.content or "", r.usage.prompt_tokens
    # ignore_eos: long enough to be in flight while the other conversation starts
    parts, usage = [], None
    for chunk in client.chat.completions.create(
        max_tokens=32, stream=True, extra_body={"ignore_eos": True}, **kw
    ):
        stream_started.set()
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    return "".join(parts), usage.prompt_tokens


def converse(fleet: Fleet, base_url: str) -> dict:
    """Two conversations interleaved (``ORDER``) through ``base_url``; per conversation the
    replica index and the prefix-cache hit tokens of each turn."""
    msgs = {c: [{"role": "system", "content": SYSTEM[c]}] for c in "ab"}
    turns = {c: 0 for c in "ab"}
    served: dict = {c: [] for c in "ab"}

    def ask(c, started=None):
        msgs[c].append({"role": "user", "content": QUESTIONS[c][turns[c]]})
        turns[c] += 1
        answer, prompt_tokens = chat(base_url, msgs[c], started)
        msgs[c].append({"role": "assistant", "content": answer})
        return prompt_tokens

    # First turns together: a streams, and b is sent once a's first chunk is back.
    before = fleet.counters()
    started, got = threading.Event(), {}
    t = threading.Thread(target=lambda: got.update(a=ask("a", started)))
    t.start()
    assert started.wait(120), "a's first turn never streamed"
    got["b"] = ask("b")
    t.join(120)
    after = fleet.counters()
    for c in "ab":  # the replica whose admitted prompt tokens grew by exactly this turn's prompt
        where = [i for i in range(2) if after[i][0] - before[i][0] in (got[c], got["a"] + got["b"])]
        served[c].append((where[0] if len(where) == 1 else None, 0.0))
    for c in ORDER:
        before = fleet.counters()
        ask(c)
        after = fleet.counters()
        grew = [i for i in range(2) if after[i][0] > before[i][0]]
        assert len(grew) == 1, f"one turn admitted on replicas {grew}"
        served[c].append((grew[0], after[grew[0]][1] - before[grew[0]][1]))
    return served


def test_conversations_stick_to_their_replica(fleet):
    models = httpx.get(fleet.url + "/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["demo"]  # the router's own list, from /server_info
    served = converse(fleet, fleet.url)
    where = {c: [i for i, _ in served[c]] for c in "ab"}
    assert where["a"][0] is not None and where["b"][0] is not None, (served, fleet.logs())
    assert where["a"][0] != where["b"][0], served  # b started while a was in flight: the idle replica
    for c in "ab":
        assert where[c] == [where[c][0]] * len(where[c]), served  # every turn where its prefix is
        assert all(hits >= 128 for _, hits in served[c][1:]), served  # ...and a cache hit there
    for u in fleet.replica_urls:
        assert metric(u, "dsv4_prefix_cache_hit_tokens_total") > 0
        load = httpx.get(u + "/get_load", timeout=10).json()
        assert load[0]["num_reqs"] == 0 and load[0]["dp_rank"] == 0


def test_round_robin_control_moves_conversations(fleet, tmp_path):
    """The same conversations through a round-robin router over the same replicas: the check
    above fails (a conversation's turns land on both replicas)."""
    port = free_ports(2)
    args, _ = replicas.parse_args(["--port", str(port), "--policy", "round_robin",
                                   "--router-metrics-port", str(port + 1)])  # fmt: skip
    cmd = replicas.router_command(args, fleet.replica_urls, None, 64, 5)
    with open(tmp_path / "router.log", "w") as log:
        router = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{args.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/readiness", timeout=2).json().get("healthy_workers") == 2:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert router.poll() is None and time.monotonic() < deadline, (
                tmp_path / "router.log"
            ).read_text()
            time.sleep(0.3)
        served = converse(fleet, url)
        assert any(len({i for i, _ in served[c]}) > 1 for c in "ab"), served
    finally:
        os.killpg(router.pid, signal.SIGKILL)
        router.wait()


def test_sigterm_stops_router_and_replicas(fleet):
    kids = children(fleet.proc.pid)
    assert len(kids) == 3  # two replicas and the router
    fleet.proc.send_signal(signal.SIGTERM)
    assert fleet.proc.wait(60) == 0, fleet.logs()
    assert not [pid for pid in kids if pathlib.Path(f"/proc/{pid}").exists()]  # reaped, none left
    for u in [fleet.url, *fleet.replica_urls]:
        with pytest.raises(httpx.HTTPError):
            httpx.get(u + "/health", timeout=2)
