"""The chat node's memory under load (clawbot.chat.memory): what closed connections leave behind is freed.

Each TLS connection the chat node accepted kept its asyncio SSLProtocol (with a 256 KiB read buffer) and uvicorn's
protocol objects after it closed, in reference cycles that Python's collector reaches only in its rare full
collections; with people reconnecting after every think time they piled up and the agent's RSS grew for minutes
(benchmarks/results/users.md). These tests run the chat app in this process (uvicorn over TLS in a thread, as
`serve` runs it) so the objects themselves can be counted; the gateway endpoint is a closed port.
"""

from __future__ import annotations

import asyncio.sslproto
import gc
import json
import socket
import ssl
import threading
import time
import weakref

import pytest
import uvicorn

from clawbot.chat import memory
from clawbot.chat.service import create_app
from clawbot.common.config import load_config
from fixtures_chat import chat_config, chat_pki, free_port  # noqa: F401

CONNECTIONS = 24
KEEP_ALIVE_S = 1  # uvicorn's default is 5 s: people who think longer find their connection closed by the node


class InProcessChat:
    """The chat app served by uvicorn with TLS in a thread of this process; stopped on exit."""

    def __init__(self, pki, workdir):
        raw = chat_config(pki, workdir, f"https://localhost:{free_port()}")
        path = workdir / "chat.json"
        path.write_text(json.dumps(raw))
        self.config = load_config(str(path))
        self.pki = pki
        chat, tls = self.config["chat"], self.config["tls"]
        self.port = chat["port"]
        self.server = uvicorn.Server(uvicorn.Config(
            create_app(self.config, str(path)), host="127.0.0.1", port=self.port, ssl_certfile=tls["server_cert"],
            ssl_keyfile=tls["server_key"], log_level="warning", lifespan="on", timeout_keep_alive=KEEP_ALIVE_S))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "InProcessChat":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the chat app did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def connect(self) -> ssl.SSLSocket:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        return context.wrap_socket(socket.create_connection(("127.0.0.1", self.port), timeout=30),
                                   server_hostname="localhost")


def get_healthz(conn: ssl.SSLSocket) -> bytes:
    """One keep-alive request on an open connection; the whole response."""
    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    data = b""
    while b'{"status":"ok"}' not in data:
        chunk = conn.recv(65536)
        assert chunk, f"connection closed early: {data!r}"
        data += chunk
    return data


def connections_in(state) -> int:
    """The node's TLS connections (asyncio SSL protocols still in memory) in `state`; counting does not collect."""
    return sum(1 for o in gc.get_objects() if isinstance(o, asyncio.sslproto.SSLProtocol) and o._state == state)


def wait_for(check, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return check()


def test_connections_that_the_node_closed_are_freed_not_kept_until_a_rare_full_collection(chat_pki, tmp_path):
    """Connections old enough for the collector's oldest generation (as a person's is after a streamed reply) go
    idle; the node closes them (keep-alive timeout: a TLS shutdown, which leaves each connection in reference
    cycles), then the clients close theirs. The node frees every one, buffers included, without anybody here
    calling the collector."""
    with InProcessChat(chat_pki, tmp_path) as chat:
        connections = [chat.connect() for _ in range(CONNECTIONS)]
        for conn in connections:
            assert get_healthz(conn).startswith(b"HTTP/1.1 200")
        gc.collect()  # survivors go to the oldest generation: these connections are long-lived now
        assert wait_for(lambda: connections_in(asyncio.sslproto.SSLProtocolState.WRAPPED) == 0, 30), (
            "the node did not close the idle connections")
        for conn in connections:
            conn.close()
        assert wait_for(lambda: connections_in(asyncio.sslproto.SSLProtocolState.SHUTDOWN) == 0, 30)
        assert wait_for(lambda: connections_in(asyncio.sslproto.SSLProtocolState.UNWRAPPED) == 0,
                        4 * memory.COLLECT_EVERY_S + 10), (
            f"{connections_in(asyncio.sslproto.SSLProtocolState.UNWRAPPED)} closed connections are still held")
        with chat.connect() as conn:  # and the node still serves
            assert get_healthz(conn).startswith(b"HTTP/1.1 200")
    assert gc.get_freeze_count() == 0  # shutdown gave the frozen objects back to the collector


def test_collect_frees_cyclic_garbage_made_after_freeze_and_leaves_the_frozen_app_alone():
    class Connection:
        def __init__(self, size: int = 0):
            self.peer, self.buffer = self, bytearray(size)  # a cycle: reference counting alone never frees it

    gc.disable()  # as between the automatic collector's rare full collections
    try:
        before = Connection()  # part of the "loaded app": frozen with it
        before_ref = weakref.ref(before)
        frozen = memory.freeze()
        try:
            assert frozen >= 1 and gc.get_freeze_count() == frozen
            del before
            closed = Connection(256 * 1024)
            closed_ref = weakref.ref(closed)
            del closed
            assert closed_ref() is not None
            assert memory.collect() >= 1
            assert closed_ref() is None  # garbage made after startup: freed
            assert before_ref() is not None  # frozen: never collected (why a reload keeps the first runtime)
        finally:
            memory.unfreeze()
        memory.collect()
        assert before_ref() is None and gc.get_freeze_count() == 0
    finally:
        gc.enable()
