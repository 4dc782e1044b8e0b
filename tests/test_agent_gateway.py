"""The model agent end to end: real llama-server on the tiny GGUF, real mTLS, the official openai client."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import os
import signal
import ssl
import threading
import time

import httpx
import openai
import pytest

from tests.fixtures_agent import (  # noqa: F401  (fixtures)
    llama_server_binary,
    model_agent,
    models_dir,
    pki_files,
    tiny_gguf,
    wait_for,
)

pytestmark = pytest.mark.slow


def openai_client(agent, cert=None, key=None, timeout: float = 60.0) -> openai.OpenAI:
    """The official client over mTLS (openai 3.x ships its own httpx fork, httpx2)."""
    try:
        import httpx2 as hx
    except ImportError:  # openai 1.x/2.x use httpx itself
        hx = httpx
    context = ssl.create_default_context(cafile=str(agent.pki.ca))
    context.load_cert_chain(str(cert or agent.pki.client_cert), str(key or agent.pki.client_key))
    http = hx.Client(verify=context, timeout=timeout)
    return openai.OpenAI(base_url=agent.url + "/v1", api_key="unused", max_retries=0, http_client=http)


# --------------------------------------------------------------------------- completions


def test_chat_completion_non_streaming(model_agent):
    client = openai_client(model_agent)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
    assert reply.choices[0].message.role == "assistant"
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.prompt_tokens > 0


def test_chat_completion_streaming_arrives_in_chunks(model_agent):
    client = openai_client(model_agent)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=16, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[-1].usage.completion_tokens == 16
    # one SSE event per token (llama-server merges only byte tokens that are half a UTF-8 character)
    assert 8 <= len(pieces) <= 16


def test_completions_streaming_and_not(model_agent):
    client = openai_client(model_agent)
    plain = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=4)
    assert plain.choices[0].text is not None and plain.usage.completion_tokens <= 4
    streamed = list(client.completions.create(model="tiny", prompt="Once", max_tokens=6, stream=True,
                                              extra_body={"ignore_eos": True}))
    assert 2 <= sum(1 for c in streamed if c.choices and c.choices[0].text) <= 6
    assert streamed[-1].choices[0].finish_reason == "length"


def test_streamed_and_plain_requests_alternate_without_upstream_errors(model_agent):
    """llama-server drops the connection after every streamed answer (despite keep-alive headers); a gateway
    that reused it answered the next request with 502 about every other time."""
    client = openai_client(model_agent)
    for i in range(16):
        kwargs = dict(model="tiny", messages=[{"role": "user", "content": f"turn {i}"}], max_tokens=2)
        if i % 2:
            assert list(client.chat.completions.create(stream=True, **kwargs))
        else:
            assert client.chat.completions.create(**kwargs).choices


def test_models_lists_the_configured_name(model_agent):
    assert [m.id for m in openai_client(model_agent).models.list().data] == ["tiny"]


def test_max_tokens_over_cap_is_400_absent_gets_cap(model_agent):
    client = openai_client(model_agent)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5000)
    assert "max_tokens (5000) is larger than this gateway allows (1024)" in str(err.value)
    with model_agent.client() as c:
        r = c.post("/v1/completions", json={"prompt": "a", "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1024


def test_tokenize_counts_exactly(model_agent):
    with model_agent.client() as c:
        text = c.post("/v1/tokenize", json={"content": "hello"}).json()
        chat = c.post("/v1/tokenize", json={"messages": [{"role": "user", "content": "hello"}]}).json()
        bad = c.post("/v1/tokenize", json={})
    assert text["count"] == len(text["tokens"]) == 5  # the tiny model's tokenizer is byte-level
    # the chat template adds the role markers and the generation prompt around the same text
    assert chat["count"] == len(chat["tokens"]) > text["count"]
    assert bad.status_code == 400 and "exactly one of" in bad.json()["error"]["message"]
    # the count matches what the model server reports for the same chat
    reply = openai_client(model_agent).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=1)
    assert reply.usage.prompt_tokens == chat["count"]


# --------------------------------------------------------------------------- mTLS


@pytest.mark.parametrize("which", ["none", "other_ca", "expired", "server_only"])
def test_bad_client_certificates_are_rejected(model_agent, which):
    pki = model_agent.pki
    cert = {"none": None, "other_ca": (pki.other_ca_cert, pki.other_ca_key), "expired": (pki.expired_cert, pki.expired_key),
            "server_only": (pki.server_only_cert, pki.server_only_key)}[which]
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    client = httpx.Client(verify=context, timeout=10)
    with client, pytest.raises(httpx.TransportError):
        client.get(model_agent.url + "/healthz")
    assert model_agent.get("/healthz").status_code == 200  # and the agent is fine


def test_client_not_in_allowlist_gets_403(model_agent):
    with model_agent.client(model_agent.pki.intruder_cert, model_agent.pki.intruder_key) as c:
        r = c.get("/v1/models")
    assert r.status_code == 403
    assert "intruder.clawbot.test" in r.json()["error"]["message"]


# --------------------------------------------------------------------------- status and metrics


def test_status_reports_model_memory_and_certs(model_agent):
    status = model_agent.status()
    model = status["model"]
    assert model["state"] == "ready" and model["pid"] > 0
    assert model["model_path"].endswith(".gguf")
    memory = model["memory"]
    assert memory["model_mapped"] is True  # load_mode mmap: the file is mapped, seen in /proc/PID/smaps
    assert memory["model_page_sizes_kib"] == [4]  # ext4/tmpfs file: 4 KiB pages, reported not assumed
    assert memory["hugepages_effective"] is False and memory["mlock_effective"] is False
    assert 0 < len(model["log_tail"]) <= 50
    assert any(" srv " in line or " slot " in line for line in model["log_tail"])  # llama-server's own lines
    assert status["tls"]["server_cert"]["days_left"] > 300
    # the loopback model server is no way around the gateway: it wants the agent's per-run key (0600 file)
    upstream = f"http://127.0.0.1:{model_agent.config['model_server']['port']}"
    assert httpx.post(upstream + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=10).status_code == 401
    assert os.stat(model_agent.state_dir / "model-server.key").st_mode & 0o077 == 0


def test_metrics_expose_requests_and_state(model_agent):
    openai_client(model_agent).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "m"}],
                                                       max_tokens=2, stream=False)
    text = model_agent.get("/metrics").text
    assert 'clawbot_gateway_requests_total{path="/v1/chat/completions",status="200"}' in text
    assert 'clawbot_model_state{clawbot_model_state="ready"} 1.0' in text
    assert "clawbot_gateway_queue_wait_seconds_bucket" in text


# --------------------------------------------------------------------------- overload


def test_overload_gets_429_with_retry_after_and_the_rest_complete(model_agent):
    """20 at once against max_concurrency 2 + queue 4: overflow is refused fast, everyone else is served."""
    barrier = threading.Barrier(20)

    def one(_):
        with model_agent.client(timeout=120) as c:
            barrier.wait(timeout=30)
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 400, "ignore_eos": True})
            return r.status_code, r.headers.get("retry-after"), r.json()

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    codes = [code for code, _, _ in results]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 6 and codes.count(429) >= 1, codes
    for code, retry_after, body in results:
        if code == 429:
            assert retry_after is not None and int(retry_after) >= 1
            assert body["error"]["code"] in ("queue_full", "rate_limited")
        else:
            assert body["usage"]["completion_tokens"] == 400
    assert model_agent.get("/readyz").status_code == 200
    assert 'clawbot_gateway_rejections_total{reason="queue_full"}' in model_agent.get("/metrics").text


# --------------------------------------------------------------------------- client disconnect


def _upstream_metric(agent, name: str) -> float:
    """A llama-server metric, read on loopback (the test runs on the model node)."""
    key = (agent.state_dir / "model-server.key").read_text().strip()
    text = httpx.get(f"http://127.0.0.1:{agent.config['model_server']['port']}/metrics", timeout=10,
                     headers={"Authorization": f"Bearer {key}"}).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(f"llamacpp:{name} ")))


def test_client_disconnect_cancels_generation_upstream(model_agent):
    before = _upstream_metric(model_agent, "tokens_predicted_total")
    with model_agent.client() as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 1024, "ignore_eos": True,
                                                       "stream": True}) as r:
            assert r.status_code == 200
            next(r.iter_raw())  # generation has started; now hang up
    wait_for(lambda: _upstream_metric(model_agent, "requests_processing") == 0, 10, 0.02,
             "llama-server to drop the request")
    wait_for(lambda: "clawbot_gateway_in_flight 0.0" in model_agent.get("/metrics").text, 10, 0.05,
             "the gateway to free the slot")
    assert _upstream_metric(model_agent, "tokens_predicted_total") - before < 1024  # it did not run to the end


# --------------------------------------------------------------------------- crash and recovery


def test_model_server_killed_mid_stream_errors_then_recovers(model_agent):
    before = model_agent.status()["model"]
    client = openai_client(model_agent, timeout=30)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "go"}],
                                            max_tokens=1024, stream=True, extra_body={"ignore_eos": True})
    iterator = iter(stream)
    next(iterator)  # generation is under way
    os.kill(before["pid"], signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(openai.APIError, match="model server stopped while generating"):
        for _ in iterator:
            pass
    assert time.monotonic() - started < 10  # a clear error, not a hang
    wait_for(lambda: model_agent.get("/readyz").status_code == 503, 10, 0.02, "/readyz to report not ready")
    wait_for(lambda: model_agent.get("/readyz").status_code == 200, 60, 0.1, "the model server to come back")
    after = model_agent.status()["model"]
    assert after["pid"] != before["pid"] and after["restarts"] == before["restarts"] + 1
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "again"}], max_tokens=2)
    assert reply.choices[0].message is not None


# --------------------------------------------------------------------------- the other engine


def test_llama_cpp_python_engine_serves_concurrent_streams_without_cutting_them(tmp_path, pki_files, tiny_gguf):
    """llama_cpp.server runs one request at a time; with interrupt_requests off a second stream waits
    instead of cutting the first one short."""
    from tests.fixtures_agent import start_agent

    agent = start_agent(tmp_path, pki_files, tiny_gguf, model_server={"engine": "llama-cpp-python"},
                        model_gateway={"max_tokens": 64})
    try:
        agent.wait_ready(120)
        client = openai_client(agent)

        def stream(_):
            chunks = list(client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=48, stream=True))
            return chunks[-1].choices[0].finish_reason if chunks[-1].choices else None

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            reasons = list(pool.map(stream, range(2)))
        assert all(r in ("length", "stop") for r in reasons), reasons  # neither was cut off
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
        with agent.client() as c:
            counted = c.post("/v1/tokenize", json={"messages": messages}).json()["count"]
        usage = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1).usage
        assert counted == usage.prompt_tokens
        assert agent.status()["model"]["command"][1:3] == ["-m", "llama_cpp.server"]
    finally:
        agent.stop()


# --------------------------------------------------------------------------- clawbot bench


def test_bench_measures_the_gateway(model_agent, tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "clawbot", "bench", model_agent.url, "--concurrency", "1,2", "--requests", "2",
         "--prompt-tokens", "32", "--max-tokens", "16", "--cacert", str(model_agent.pki.ca),
         "--cert", str(model_agent.pki.client_cert), "--key", str(model_agent.pki.client_key), "--json", str(out)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "TTFT p50" in done.stdout
    report = json.loads(out.read_text())
    for level in report["levels"]:
        assert level["completed"] == 2 and level["failed"] == 0
        assert level["output_tokens"] == 2 * 16  # ignore_eos, counted from the server's usage
        assert 0 < level["ttft_ms"]["p50"] <= level["e2e_ms"]["p50"]
        assert level["output_throughput_tok_s"] > 0


# --------------------------------------------------------------------------- a model that cannot start


@pytest.mark.parametrize("problem", ["missing", "not_gguf", "wrong_sha256"])
def test_bad_model_file_is_reported_as_failed_with_the_reason(tmp_path, pki_files, tiny_gguf, problem):
    from tests.fixtures_agent import start_agent

    model, sha = tiny_gguf, ""
    if problem == "missing":
        model = tmp_path / "absent.gguf"
    elif problem == "not_gguf":
        model = tmp_path / "model.gguf"
        model.write_bytes(b"<html>a download error page</html>")
    else:
        sha = "0" * 64
    agent = start_agent(tmp_path / "agent", pki_files, model, model_server={"model_sha256": sha})
    try:
        wait_for(lambda: agent.status()["model"]["state"] == "failed", 30, 0.1, "the failed state")
        status = agent.status()["model"]
        expected = {"missing": "does not exist", "not_gguf": "is not a GGUF file", "wrong_sha256": "has sha256"}[problem]
        assert expected in status["reason"] and "next start in" in status["reason"]
        assert any(expected in line for line in status["log_tail"])
        assert agent.get("/readyz").status_code == 503 and agent.get("/healthz").status_code == 200
        with agent.client() as c:
            r = c.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.headers["retry-after"] and "not ready" in r.json()["error"]["message"]
    finally:
        agent.stop()
