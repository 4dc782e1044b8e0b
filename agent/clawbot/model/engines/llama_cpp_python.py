"""llama-cpp-python's own server (`python -m llama_cpp.server`), from the wheel in the agent's venv: one request
at a time (module-level locks), no /health, a config file instead of flags, its own tokenizer endpoints.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from clawbot.model.engines import Paths, Post, Refused

if TYPE_CHECKING:
    from clawbot.model.runplan import RunPlan

NAME = "llama-cpp-python"
HEALTH_PATH = "/v1/models"  # it has no /health; this answers once the model is loaded
MAX_SLOTS = 1
IN_AGENT_VENV = True  # runs from the agent's venv: wheelhouses carry it, GPU nodes rebuild it there
MAX_SLOTS_WHY = "llama_cpp.server serves one request at a time"
AUTO_FLASH_ATTENTION = ("off", "llama_cpp.server takes only on or off, and off is its default")
UNSUPPORTED_FIELDS = frozenset({"ignore_eos"})
RPC_SPLIT = False  # the wheel is built without GGML_RPC, and its server has no --rpc
SPECULATIVE = False  # its prompt-lookup decoding (draft_model) was not measured here: the run plan says off
SETTINGS_FILE = "llama-cpp-python.json"
# llama.cpp / ggml type ids for type_k/type_v (ggml.h enum ggml_type).
GGML_TYPE_IDS = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}


def builds(find: Callable[[str], Path | None], wanted: str) -> None:
    """None: the wheel in this venv runs on whatever it was built for (the rollout builds it per node)."""
    return None


def settings(plan: RunPlan, config: dict, model_path: str, api_key: str | None = None) -> dict:
    """llama_cpp.server's config file. interrupt_requests is off: by default a new request cuts the
    running stream, which the gateway's single admitted request already prevents but must never rely on."""
    server = config["model_server"]
    mode = plan.load_mode.value
    threads = plan.threads.value
    model = {
        "model": model_path,
        "model_alias": server["model_name"],
        "n_ctx": config["context_window"],
        "n_threads": threads,
        "n_threads_batch": threads,
        "n_gpu_layers": -1 if plan.gpu_layers.value == "all" else int(plan.gpu_layers.value),
        "n_batch": plan.ubatch.value,
        "n_ubatch": plan.ubatch.value,
        "use_mmap": mode in ("mmap", "mmap+mlock"),
        "use_mlock": mode in ("mlock", "mmap+mlock"),
        "flash_attn": plan.flash_attention.value == "on",
        "type_k": GGML_TYPE_IDS[server["cache_type_k"]],
        "type_v": GGML_TYPE_IDS[server["cache_type_v"]],
        "verbose": True,
    }
    if server["chat_template"]:
        model["chat_format"] = server["chat_template"]
    result = {"host": "127.0.0.1", "port": server["port"], "interrupt_requests": False, "models": [model]}
    if api_key:
        result["api_key"] = api_key
    return result


def _settings_file(paths: Paths) -> Path:
    assert paths.state_dir is not None, "llama_cpp.server reads its settings from a file in the state directory"
    return paths.state_dir / SETTINGS_FILE


def command(plan: RunPlan, config: dict, paths: Paths) -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--config_file", str(_settings_file(paths))]


def private_files(plan: RunPlan, config: dict, paths: Paths, api_key: str) -> dict[Path, str]:
    return {_settings_file(paths): json.dumps(settings(plan, config, paths.model, api_key), indent=2)}


async def tokenize(post: Post, config: dict, *, content: str | None, messages: list[dict] | None,
                   add_special: bool | None, add_generation_prompt: bool) -> list[int]:
    """llama_cpp.server always prepends BOS in /extras/tokenize; it is stripped where llama_cpp itself
    would not add it (plain text unless add_special; a rendered chat, whose template adds its own)."""
    from clawbot.common import chattemplate

    async def tok(text: str) -> list[int]:
        return (await post("/extras/tokenize", {"input": text}))["tokens"]

    bos_prefix = await tok("")
    if messages is None:
        text, special = content, bool(add_special)
    else:
        server = config["model_server"]
        if server["chat_template"]:
            raise Refused(501, "tokenizing `messages` with a named chat_template needs the llama-server engine; "
                          "send `content` instead", "not_supported", "not_supported")
        path = server["model_path"]
        template, bos_id, eos_id = chattemplate.gguf_template_info(path, os.stat(path).st_mtime_ns)
        if template is None:
            raise Refused(400, "the model has no chat template; send `content` instead", "no_template")

        async def piece(token_id: int | None) -> str:
            if token_id is None:
                return ""
            return (await post("/extras/detokenize", {"tokens": [token_id]}))["text"]

        try:
            text = chattemplate.render(template, messages, bos_token=await piece(bos_id),
                                       eos_token=await piece(eos_id), add_generation_prompt=add_generation_prompt)
        except chattemplate.TemplateError as exc:
            raise Refused(400, str(exc), "template_error") from None
        special = False if add_special is None else add_special
    tokens = await tok(text)
    if not special and bos_prefix and tokens[: len(bos_prefix)] == bos_prefix:
        tokens = tokens[len(bos_prefix):]
    return tokens
