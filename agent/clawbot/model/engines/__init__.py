"""Model-server engines: building llama-server (build) and one adapter per engine (llama_server,
llama_cpp_python) for everything that differs between them: the command line, the health path, the slot
limit, how `auto` flash attention is passed on off CUDA (the run plan turns it on with CUDA), tokenizing,
the request fields they accept.

Code outside this package asks `engine_for(name)` instead of comparing engine names
(tests/test_architecture.py keeps it that way).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from clawbot.model.runplan import RunPlan

# post(path, json body) -> the model server's JSON answer; raises on an error status (the gateway's rules)
Post = Callable[[str, dict], Awaitable[dict]]


@dataclass(frozen=True)
class Paths:
    """What the supervisor prepared for one start."""

    model: str  # the file to serve: the staged copy in huge pages, or the file on disk
    binary: str = ""  # the engine build for plan.accelerator, for engines that have builds
    state_dir: Path | None = None  # where private files (API key, settings) go; llama-server: None runs it
    # without an API key (benchmarks); llama-cpp-python needs one for its settings file


class Refused(Exception):
    """This engine cannot answer the request as asked; the gateway answers `status` with the message."""

    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type_


class Engine(Protocol):
    NAME: str
    HEALTH_PATH: str  # answers 200 once the model is loaded
    IN_AGENT_VENV: bool  # a Python package in the agent's venv (wheelhouses carry it) rather than a binary
    MAX_SLOTS: int | None  # requests it can serve at once whatever the config says; None: no own limit
    MAX_SLOTS_WHY: str
    AUTO_FLASH_ATTENTION: tuple[str, str]  # (value, why) for flash_attention `auto` off CUDA
    UNSUPPORTED_FIELDS: frozenset[str]  # request fields the gateway drops before forwarding
    RPC_SPLIT: bool  # can hand layers to RPC workers (model_server.split)
    SPECULATIVE: bool  # started with speculative decoding when the run plan says so (model_server.speculative)

    def builds(self, find: Callable[[str], Path | None], wanted: str) -> dict[str, str] | None:
        """{accelerator: binary} of this node's builds for `wanted` and the CPU (its fallback); None: the engine
        has no per-accelerator builds."""

    def command(self, plan: RunPlan, config: dict, paths: Paths) -> list[str]:
        """argv of the model server: a pure function of the plan, the config and the paths."""

    def private_files(self, plan: RunPlan, config: dict, paths: Paths, api_key: str) -> dict[Path, str]:
        """Files the supervisor writes (0600) before the start: {path: text}."""

    async def tokenize(self, post: Post, config: dict, *, content: str | None, messages: list[dict] | None,
                       add_special: bool | None, add_generation_prompt: bool) -> list[int]:
        """Token ids of `content`, or of `messages` rendered with the chat template."""


@functools.cache
def engine_for(name: str) -> Engine:
    """The adapter for model_server.engine."""
    from clawbot.model.engines import llama_cpp_python, llama_server

    adapters: dict[str, Engine] = {llama_server.NAME: llama_server, llama_cpp_python.NAME: llama_cpp_python}
    try:
        return adapters[name]
    except KeyError:
        raise ValueError(f"unknown model_server.engine {name!r}; choose one of {', '.join(adapters)}") from None
