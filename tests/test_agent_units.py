"""Agent pieces that need no model server: config refusal at start, admission control, the engines'
command lines, the model file checks and the /proc readers."""

from __future__ import annotations

import asyncio
import json
import mmap
import subprocess
import sys
from pathlib import Path

import pytest

from clawbot.common import preflight
from clawbot.model import supervisor
from clawbot.model.admission import Admission, Rejected
from clawbot.model.engines import Paths, llama_cpp_python, llama_server
from clawbot.model.runplan import HostFacts, RunPlan
from clawbot.common.config import defaults


# --------------------------------------------------------------------------- start with a bad config


def test_invalid_config_does_not_start_and_names_the_position(tmp_path):
    bad = tmp_path / "clawbot.json"
    bad.write_text('{\n  "model_gateway": {\n    "max_tokens": "lots"\n  }\n}\n')
    done = subprocess.run([sys.executable, "-m", "clawbot", "agent", "--role", "model", "--config", str(bad),
                           "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 78
    assert f"{bad}:3:19: error: /model_gateway/max_tokens: expected an integer" in done.stderr
    assert not (tmp_path / "state").exists()  # nothing was started


def test_missing_config_is_refused_the_same_way(tmp_path):
    done = subprocess.run([sys.executable, "-m", "clawbot", "agent", "--role", "model", "--config",
                           str(tmp_path / "nope.json")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 78 and "no such file" in done.stderr


# --------------------------------------------------------------------------- admission


def _admission(**kw) -> Admission:
    args = dict(requests_per_second=100, burst=100, max_concurrency=2, queue_length=2, queue_timeout_s=5)
    args.update(kw)
    return Admission(**args)


def test_admission_queues_then_refuses_overflow():
    async def scenario():
        adm = _admission()
        await adm.acquire()
        await adm.acquire()
        waiting = [asyncio.create_task(adm.acquire()) for _ in range(2)]
        await asyncio.sleep(0)
        assert adm.queued == 2
        with pytest.raises(Rejected) as err:
            await adm.acquire()
        assert err.value.reason == "queue_full" and int(err.value.retry_after_header) >= 1
        adm.release(1.0)
        for _ in range(10):  # the waiter's task needs a few loop turns to finish
            await asyncio.sleep(0)
        assert waiting[0].done() and not waiting[1].done()  # FIFO: the oldest waiter gets the slot
        adm.release(1.0)
        await asyncio.gather(*waiting)
        assert adm.active == 2 and adm.queued == 0

    asyncio.run(scenario())


def test_admission_queue_timeout_and_rate_limit():
    async def scenario():
        adm = _admission(max_concurrency=1, queue_timeout_s=0.05)
        await adm.acquire()
        with pytest.raises(Rejected) as err:
            await adm.acquire()
        assert err.value.reason == "queue_timeout" and err.value.status == 503  # slow, not "too many requests"
        clock = [0.0]
        limited = Admission(requests_per_second=2, burst=1, max_concurrency=5, queue_length=5, queue_timeout_s=1,
                            clock=lambda: clock[0])
        await limited.acquire()
        with pytest.raises(Rejected) as err:
            await limited.acquire()
        assert err.value.reason == "rate_limited" and err.value.retry_after == pytest.approx(0.5)
        clock[0] = 0.5
        await limited.acquire()  # refilled

    asyncio.run(scenario())


def test_admission_retry_after_from_measured_service_times():
    """Retry-After comes from the median measured slot time: queue_full says when the oldest running request
    should end (a place in the queue frees), a queue timeout when a request queued now would be served."""
    async def scenario():
        clock = [100.0]
        adm = Admission(requests_per_second=1000, burst=1000, max_concurrency=2, queue_length=1, queue_timeout_s=1,
                        clock=lambda: clock[0])
        assert adm.service_s == 5.0 and adm.measured == 0  # the prior, until something was measured
        for service in (8.0, 12.0, 10.0):
            await adm.acquire()
            clock[0] += service
            adm.release(service)
        assert adm.service_s == 10.0 and adm.measured == 3
        await adm.acquire()
        clock[0] += 4.0
        await adm.acquire()
        queued = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        with pytest.raises(Rejected) as err:
            await adm.acquire()
        assert (err.value.reason, err.value.status) == ("queue_full", 429)
        assert err.value.retry_after == pytest.approx(6.0)  # 10 s median, the oldest has run 4 s
        assert err.value.retry_after_header == "6"
        queued.cancel()

    asyncio.run(scenario())


def test_admission_limits_change_live():
    async def scenario():
        adm = _admission(max_concurrency=1)
        await adm.acquire()
        waiter = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        gw = defaults()["model_gateway"]
        gw.update(max_concurrency=2, queue_length=2, queue_timeout_s=5)
        adm.update(gw)
        await asyncio.wait_for(waiter, 1)  # the raised limit admits the waiter at once
        assert adm.active == 2

    asyncio.run(scenario())


# --------------------------------------------------------------------------- command lines


def _config(**server):
    config = defaults()
    config["model_server"].update(server)
    return config


def _cpu_plan(config: dict) -> RunPlan:
    """The plan on a 2-core CPU node with unknown free memory and no memlock limit (the model is not read)."""
    facts = HostFacts(gpus=(), host_free_bytes=None, usable_cores=2, memlock_limit=preflight.UNLIMITED)
    return RunPlan.resolve(config, facts, None)


def _llama_server_command(config: dict, key_dir: Path | None = None) -> list[str]:
    return llama_server.command(_cpu_plan(config), config, Paths(model="/m.gguf", binary="/bin/llama-server",
                                                                state_dir=key_dir))


def test_llama_server_command_gives_each_slot_the_context_window():
    config = _config(parallel_slots=3, threads=2, chat_template="chatml", extra_args=["--cache-reuse", "256"],
                     load_mode="mmap", accelerator="cpu")
    config["context_window"] = 4096
    cmd = _llama_server_command(config)
    flags = {name: cmd[cmd.index(name) + 1] for name in cmd if name.startswith("-") and name != "-no-kvu"}
    assert flags["-c"] == str(4096 * 3) and flags["-np"] == "3" and "-no-kvu" in cmd
    assert flags["--host"] == "127.0.0.1" and flags["--alias"] == "clawbot" and flags["-lm"] == "mmap"
    assert flags["-ngl"] == "0" and flags["--chat-template"] == "chatml" and "--metrics" in cmd
    assert flags["-t"] == "2" and "--api-key-file" not in cmd
    assert cmd[0] == "/bin/llama-server" and cmd[-2:] == ["--cache-reuse", "256"]


def test_the_api_key_goes_to_a_private_file_the_command_names(tmp_path):
    config = _config(accelerator="cpu")
    paths = Paths(model="/m.gguf", binary="/bin/llama-server", state_dir=tmp_path)
    files = llama_server.private_files(_cpu_plan(config), config, paths, "secret")
    (key_file, text), = files.items()
    assert text == "secret\n" and key_file.parent == tmp_path
    cmd = llama_server.command(_cpu_plan(config), config, paths)
    assert cmd[cmd.index("--api-key-file") + 1] == str(key_file)


def test_named_chat_template_uses_the_builtin_engine_and_jinja_text_uses_jinja():
    """With Jinja on (llama-server's default) a name like "gemma" would be taken as a literal template and
    every message dropped (seen: a 3-token prompt for any conversation)."""
    named = _llama_server_command(_config(chat_template="gemma"))
    assert named[named.index("--chat-template") - 1] == "--no-jinja"
    text = "{% for m in messages %}{{ m.content }}{% endfor %}"
    jinja = _llama_server_command(_config(chat_template=text))
    assert jinja[jinja.index("--chat-template") - 1] == "--jinja" and jinja[jinja.index("--chat-template") + 1] == text


def test_llama_cpp_python_settings_turn_interrupt_requests_off():
    config = _config(engine="llama-cpp-python", load_mode="mmap+mlock", cache_type_k="q8_0")
    settings = llama_cpp_python.settings(_cpu_plan(config), config, "/m.gguf")
    assert settings["interrupt_requests"] is False and settings["host"] == "127.0.0.1"
    model = settings["models"][0]
    assert model["use_mmap"] and model["use_mlock"] and model["type_k"] == 8 and model["n_ctx"] == 8192
    # the plan's numbers, as llama-server would get them: 1 thread of 2 cores, 512-token batches, no offload
    assert (model["n_threads"], model["n_ubatch"], model["n_gpu_layers"], model["flash_attn"]) == (1, 512, 0, False)


# --------------------------------------------------------------------------- model file checks


def test_model_file_checks(tmp_path):
    with pytest.raises(supervisor.ModelFileError, match="does not exist"):
        supervisor.check_model_file(str(tmp_path / "missing.gguf"))
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(supervisor.ModelFileError, match="not a GGUF"):
        supervisor.check_model_file(str(not_gguf))
    good = tmp_path / "m.gguf"
    good.write_bytes(b"GGUF" + b"\0" * 100)
    digest = supervisor.file_sha256(good)
    supervisor.check_model_file(str(good), digest, tmp_path / "state")
    with pytest.raises(supervisor.ModelFileError, match="has sha256"):
        supervisor.check_model_file(str(good), "0" * 64, tmp_path / "state")


def test_sha256_is_cached_by_inode_size_and_mtime(tmp_path, monkeypatch):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\1" * 1000)
    state = tmp_path / "state"
    first = supervisor.file_sha256(model, state)
    assert json.loads((state / "sha256-cache.json").read_text())
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (opened.append(str(p)), real_open(p, *a, **k))[1])
    assert supervisor.file_sha256(model, state) == first
    assert str(model) not in opened  # answered from the cache, file not re-read
    model.write_bytes(b"GGUF" + b"\2" * 1000)  # changed: hashed again
    assert supervisor.file_sha256(model, state) != first


def test_memory_evidence_reads_the_mapping_of_the_model_file(tmp_path):
    """Map a file in a child and read its smaps: the page size is what the kernel reports."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * (1 << 20))
    child = subprocess.Popen([sys.executable, "-c", (
        "import mmap,sys; f=open(sys.argv[1],'rb'); m=mmap.mmap(f.fileno(),0,access=mmap.ACCESS_READ); "
        "m[:4]; print('ok',flush=True); sys.stdin.read()"), str(model)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ok"
        evidence = supervisor.memory_evidence(child.pid, str(model))
    finally:
        child.stdin.close()
        child.wait(timeout=10)
    assert evidence["model_mapped"] and evidence["model_mapped_kib"] >= 1024
    assert evidence["model_page_sizes_kib"] == [mmap.PAGESIZE // 1024]
    assert evidence["hugepages_effective"] is False and evidence["mlock_effective"] is False
    assert evidence["vm_locked_kib"] == 0


# --------------------------------------------------------------------------- SSE observation


def test_stream_observer_counts_tokens_in_lf_and_crlf_streams():
    from clawbot.model.gateway import StreamObserver

    events = [{"choices": [{"delta": {"role": "assistant"}}]}, {"choices": [{"delta": {"content": "a"}}]},
              {"choices": [{"delta": {"content": "b"}}]}, {"choices": [], "usage": {"completion_tokens": 3}}]
    for sep in (b"\n\n", b"\r\n\r\n"):
        raw = b"".join(b"data: " + json.dumps(e).encode() + sep for e in events) + b"data: [DONE]" + sep
        observer = StreamObserver()
        for i in range(0, len(raw), 7):  # arbitrary chunk boundaries, as TCP delivers them
            observer.feed(raw[i:i + 7])
        assert observer.tokens == 2 and observer.usage_tokens == 3 and observer.first_token_at is not None


# --------------------------------------------------------------------------- upstream keep-alive race


def test_gateway_resends_once_when_the_model_server_closes_without_answering():
    """llama-server closes keep-alive connections idle for 5 s; a request that races that close gets no
    answer at all. A real TCP server here: its first connection is read and closed unanswered, the
    second answers. The gateway's sender retries once on a fresh connection; a second silent close fails."""
    import types

    import httpx

    from clawbot.model.gateway import Gateway

    async def scenario(silent_closes: int) -> tuple[int | None, int]:
        seen = {"connections": 0}

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
            seen["connections"] += 1
            await reader.readuntil(b"\r\n\r\n")
            if seen["connections"] <= silent_closes:
                writer.close()
                return
            body = b'{"ok": true}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            fake = types.SimpleNamespace(client=client, supervisor=types.SimpleNamespace(ready=True))
            request = client.build_request("POST", "/v1/completions", json={"prompt": "x"})
            try:
                response = await Gateway._send_upstream(fake, request)
                status = response.status_code
            except httpx.RemoteProtocolError:
                status = None
        server.close()
        await server.wait_closed()
        return status, seen["connections"]

    assert asyncio.run(scenario(silent_closes=1)) == (200, 2)
    assert asyncio.run(scenario(silent_closes=2)) == (None, 2)  # once, not a loop


def test_gateway_admits_no_more_at_once_than_the_slots_the_model_server_got():
    """parallel_slots auto may give fewer slots than max_concurrency (too little memory for their KV cache):
    the gateway's concurrency follows, so the rest wait in its queue, not invisibly inside llama-server."""
    import dataclasses
    import types

    from clawbot.model.gateway import Gateway
    from clawbot.model.runplan import Decision

    config = defaults()
    config["model_gateway"]["max_concurrency"] = 4
    config["model_server"]["parallel_slots"] = 0
    fake = types.SimpleNamespace(plan=None, listeners=[], status=types.SimpleNamespace(state="loading"),
                                 base_url="http://127.0.0.1:9", auth_headers={}, ready=False)

    def plan_with_slots(n: int) -> RunPlan:
        return dataclasses.replace(_cpu_plan(config), slots=Decision(n, "test"))

    async def scenario():
        gateway = Gateway(config, fake)
        before = gateway.admission.max_concurrency
        fake.plan = plan_with_slots(2)
        for listener in fake.listeners:
            listener("ready")
        after = gateway.admission.max_concurrency
        fake.plan = plan_with_slots(6)
        gateway.apply(config)
        await gateway.close()
        return before, after, gateway.admission.max_concurrency

    assert asyncio.run(scenario()) == (4, 2, 4)


def test_inventory_accelerator_reaches_the_agent_through_its_environment():
    from clawbot.agentmain import ConfigErrorText, with_node_overrides

    assert with_node_overrides(defaults(), {})["model_server"]["accelerator"] == "auto"
    assert with_node_overrides(defaults(), {"CLAWBOT_ACCELERATOR": "cuda"})["model_server"]["accelerator"] == "cuda"
    with pytest.raises(ConfigErrorText, match="CLAWBOT_ACCELERATOR='gpu' is not one of"):
        with_node_overrides(defaults(), {"CLAWBOT_ACCELERATOR": "gpu"})
