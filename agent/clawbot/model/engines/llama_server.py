"""llama-server, built from the llama.cpp vendored in the pinned llama-cpp-python sdist (`clawbot build-engine`):
parallel slots with continuous batching, /health, /tokenize and /apply-template.

Every argument clawbot passes is one `Flag` in FLAGS, with where its value comes from and why: `command`
builds the command line from that table and `clawbot docs` renders docs/llama-server-flags.md from it, so the
page describes exactly what runs. Every setting is explicit, so `ps` shows the whole picture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clawbot.model.engines import Paths, Post
from clawbot.model.engines import build

if TYPE_CHECKING:
    from clawbot.model.runplan import RunPlan

NAME = "llama-server"
HEALTH_PATH = "/health"
APPLY_TEMPLATE_PATH = "/apply-template"
TOKENIZE_PATH = "/tokenize"
MAX_SLOTS = None
IN_AGENT_VENV = False  # a binary of its own (engines/build.py), not a Python package
MAX_SLOTS_WHY = ""
AUTO_FLASH_ATTENTION = ("auto", "llama.cpp decides per backend (it turns it on where the backend has the op)")
UNSUPPORTED_FIELDS: frozenset[str] = frozenset()
RPC_SPLIT = True  # built with GGML_RPC: --rpc hands layers to ggml-rpc-server on other nodes
SPECULATIVE = True  # --spec-type (n-gram lookup, a draft model)
# model_server.speculative `ngram`: llama.cpp's ngram-mod (a rolling hash of the last n_match tokens, constant
# memory, one pool for all slots) with the lengths of its own --spec-default; shorter drafts (12/4/16) were no better on
# an H200 or on CPUs (benchmarks/results/gpu-h200-speculative.md)
NGRAM_ARGS = ("--spec-type", "ngram-mod", "--spec-ngram-mod-n-match", "24", "--spec-ngram-mod-n-min", "48",
              "--spec-ngram-mod-n-max", "64")
DRAFT_MAX = 8  # tokens a draft model proposes per step (llama.cpp's default is 3)
API_KEY_FILE = "model-server.key"
MIN_BATCH = 2048  # llama.cpp's default -b


@dataclass(frozen=True)
class Inputs:
    plan: RunPlan
    config: dict
    paths: Paths

    @property
    def server(self) -> dict:
        return self.config["model_server"]

    @property
    def rpc_workers(self) -> list[dict]:
        return list(self.server.get("split", {}).get("workers", []))

    @property
    def api_key_file(self) -> Path | None:
        return self.paths.state_dir / API_KEY_FILE if self.paths.state_dir else None


@dataclass(frozen=True)
class Flag:
    """One llama-server argument: what clawbot passes (args), from where (source) and why."""

    flag: str  # as the docs show it
    args: Callable[[Inputs], list[str]]  # the argv words; [] leaves the flag out
    source: str
    why: str


def _fixed(flag: str, *value: str, why: str) -> Flag:
    """A flag clawbot always passes, with the same value."""
    return Flag(flag, lambda i: [flag, *value], f"always `{' '.join((flag, *value))}`", why)


def _rpc(i: Inputs) -> list[str]:
    workers = i.rpc_workers
    return ["--rpc", ",".join(f"127.0.0.1:{w['port']}" for w in workers)] if workers else []


def _rpc_devices(i: Inputs) -> list[str]:
    # one RPC device per worker (their ggml-rpc-server runs the CPU build), named in --rpc order
    workers = i.rpc_workers
    return ["-dev", ",".join(f"RPC{n}" for n in range(len(workers)))] if workers else []


def _tensor_split(i: Inputs) -> list[str]:
    cut = i.plan.split.value
    return ["-ts", ",".join(str(n) for n in cut.tensor_split)] if cut is not None else []


def _speculative(i: Inputs) -> list[str]:
    value = i.plan.speculative.value
    if value == "off":
        return []
    if value == "ngram":
        return list(NGRAM_ARGS)
    return ["--spec-type", "draft-simple", "-md", value, "-ngld", "0" if i.plan.gpu_layers.value == "0" else "all",
            "--spec-draft-n-max", str(DRAFT_MAX)]


def _chat_template(i: Inputs) -> list[str]:
    template = i.server["chat_template"]
    if not template:
        return []
    return ["--jinja" if "{" in template else "--no-jinja", "--chat-template", template]


FLAGS: tuple[Flag, ...] = (
    Flag("-m", lambda i: ["-m", i.paths.model],
         "`model_server.model_path`, or its copy in huge pages when `RunPlan.staging` staged it",
         "hugetlbfs files mmap like any file; the staged copy keeps the weights in 2 MiB pages"),
    Flag("--rpc", _rpc,
         "`model_server.split.workers`: 127.0.0.1 and each worker's `port`, in layer order; left out without a split",
         "each port is this node's end of an mTLS tunnel (stunnel) to one worker's ggml-rpc-server, which listens on "
         "the worker's loopback only: RPC itself has no authentication"),
    Flag("-dev", _rpc_devices, "`RPC0,RPC1,…`: one device per split worker; left out without a split",
         "the offloaded layers go to the workers only, never to a GPU of this node that sizing did not count"),
    _fixed("--host", "127.0.0.1", why="loopback only: the mTLS gateway is the only way in"),
    Flag("--port", lambda i: ["--port", str(i.server["port"])], "`model_server.port`",
         "the loopback port the gateway forwards to"),
    Flag("-c", lambda i: ["-c", str(i.config["context_window"] * i.plan.slots.value)],
         "`context_window` × `RunPlan.slots`",
         "with -no-kvu llama.cpp gives each slot -c / -np cells: `context_window` per conversation, as the "
         "schema promises"),
    Flag("-np", lambda i: ["-np", str(i.plan.slots.value)],
         "`RunPlan.slots`: `model_server.parallel_slots`; 0: `model_gateway.max_concurrency` slots when their KV "
         "cache fits (the GPU's memory when every layer is offloaded, else the host's), else the most that fit",
         "conversations decoded together (continuous batching); the gateway admits no more at once"),
    _fixed("-no-kvu", why="one KV cache per slot: a long conversation cannot take another slot's cells"),
    Flag("-t", lambda i: ["-t", str(i.plan.threads.value)],
         "`RunPlan.threads`: `model_server.threads`; 0: the usable cores but one",
         "the gateway keeps one core: llama.cpp's threads wait for each other, so one preempted thread "
         "stalls them all"),
    Flag("-ngl", lambda i: ["-ngl", i.plan.gpu_layers.value],
         "`RunPlan.gpu_layers`: `model_server.gpu_layers`; -1: with CUDA `all` when the whole model fits the "
         "freest GPU (nvidia-smi), else the most layers that fit; `all` on Vulkan and ROCm (their free memory is "
         "not read); 0 on the CPU build; with `model_server.split` the split workers' layers and the output head",
         "the split is clawbot's sizing, checked by preflight before a rollout"),
    Flag("-ts", _tensor_split,
         "`RunPlan.split`: each split worker's share of the offloaded layers (the output head counts as one), whole "
         "layer counts; left out without a split",
         "llama.cpp cuts the last -ngl layers between the devices in these proportions: whole counts make the cut "
         "exactly the one preflight sized (every node fills the same fraction of its memory)"),
    Flag("-b", lambda i: ["-b", str(max(MIN_BATCH, i.plan.ubatch.value))],
         f"the larger of `RunPlan.ubatch` and {MIN_BATCH}", "llama.cpp's default, and never below -ub"),
    Flag("-ub", lambda i: ["-ub", str(i.plan.ubatch.value)],
         "`RunPlan.ubatch`: `model_server.ubatch_size`; 0: 1024 when layers run on a GPU, 512 on a CPU",
         "a chat prompt in one pass on a GPU (a shorter first token); sizing counts the compute buffer at this size"),
    _fixed("-fit", "off", why="llama.cpp would shrink context and offload to fit device memory on its own; "
                              "clawbot's sizing decides, and a silent change would make its numbers wrong"),
    Flag("-fa", lambda i: ["-fa", i.plan.flash_attention.value],
         "`RunPlan.flash_attention`: `model_server.flash_attention`; `auto` is `on` with CUDA, else passed on",
         "measured on an H100: faster prefill and a smaller KV working set; sizing counts `auto` as on"),
    Flag("-ctk", lambda i: ["-ctk", i.server["cache_type_k"]], "`model_server.cache_type_k`",
         "the K cache type sizing counts"),
    Flag("-ctv", lambda i: ["-ctv", i.server["cache_type_v"]], "`model_server.cache_type_v`",
         "the V cache type sizing counts (a quantized one needs flash attention)"),
    Flag("-lm", lambda i: ["-lm", i.plan.load_mode.value],
         "`RunPlan.load_mode`: `model_server.load_mode`; `auto`: mmap+mlock when the memlock limit covers the "
         "model, else mmap", "this llama.cpp replaced --mlock and --no-mmap by --load-mode"),
    Flag("--alias", lambda i: ["--alias", i.server["model_name"]], "`model_server.model_name`",
         "the model id /v1/models shows and requests name"),
    Flag("--spec-type, -md, -ngld, --spec-*", _speculative,
         "`RunPlan.speculative`: `model_server.speculative`; `ngram`: `" + " ".join(NGRAM_ARGS) + "`; a draft "
         f"GGUF: `--spec-type draft-simple -md PATH -ngld all` (`0` on the CPU build) `--spec-draft-n-max {DRAFT_MAX}`; "
         "left out when off (`auto` resolves to off where nothing measured supports it)",
         "n-gram lookup needs no second model and pays where replies repeat text; a draft model pays only when it "
         "predicts the main model well. llama-server reports drafted and accepted tokens per reply in `timings`"),
    _fixed("--metrics", why="llama-server's own counters (`llamacpp:*`) on loopback, behind the API key, for "
                            "debugging on the node; the agent does not read them (its gateway has its own /metrics)"),
    _fixed("--no-slots", why="GET /slots would show every slot's prompt"),
    _fixed("--no-ui", why="the chat node serves the UI"),
    _fixed("-cram", "0", why="the prompt cache would take up to 8 GiB of host RAM that sizing does not count"),
    _fixed("--log-colors", "off", why="the log tail in /status and the journal are plain text"),
    Flag("--jinja / --no-jinja, --chat-template", _chat_template,
         "`model_server.chat_template`; left out when empty (the GGUF's own template)",
         "a built-in name such as `gemma` needs the legacy engine: Jinja would take it as a literal template and "
         "drop every message; template text (with `{`) needs Jinja"),
    Flag("--api-key-file", lambda i: ["--api-key-file", str(i.api_key_file)] if i.api_key_file else [],
         f"a random key per agent run, in the agent's state directory (`{API_KEY_FILE}`, 0600)",
         "other local users cannot bypass the gateway (mTLS, limits, validation) through loopback"),
    Flag("(extra arguments)", lambda i: list(i.server["extra_args"]), "`model_server.extra_args`",
         "passed on as they are, after clawbot's own"),
)


def builds(find: Callable[[str], Path | None], wanted: str) -> dict[str, str]:
    """The builds for `wanted` and the CPU: each found build is version-checked, so only those two are looked up."""
    return {accelerator: str(binary) for accelerator in dict.fromkeys((wanted, "cpu")) if (binary := find(accelerator))}


def command(plan: RunPlan, config: dict, paths: Paths) -> list[str]:
    inputs = Inputs(plan, config, paths)
    return [paths.binary] + [word for flag in FLAGS for word in flag.args(inputs)]


def private_files(plan: RunPlan, config: dict, paths: Paths, api_key: str) -> dict[Path, str]:
    key_file = Inputs(plan, config, paths).api_key_file
    return {key_file: api_key + "\n"} if key_file else {}


async def tokenize(post: Post, config: dict, *, content: str | None, messages: list[dict] | None,
                   add_special: bool | None, add_generation_prompt: bool) -> list[int]:
    """`messages` are rendered by llama-server's own template code (/apply-template), then tokenized with
    BOS unless add_special is false; plain text is tokenized without BOS unless add_special."""
    if messages is not None:
        rendered = await post(APPLY_TEMPLATE_PATH, {"messages": messages, "add_generation_prompt": add_generation_prompt})
        text, special = rendered["prompt"], True if add_special is None else add_special
    else:
        text, special = content, bool(add_special)
    answer = await post(TOKENIZE_PATH, {"content": text, "add_special": special, "parse_special": True})
    return answer["tokens"]


# --------------------------------------------------------------------------- docs/llama-server-flags.md

ENDPOINTS = (
    (HEALTH_PATH, "the supervisor, while loading", "200 once the model is loaded (503 before); then a 1-token "
                                                   "/v1/completions proves it can generate"),
    ("/v1/chat/completions, /v1/completions", "the gateway", "what clients call, forwarded after validation"),
    (f"{APPLY_TEMPLATE_PATH}, {TOKENIZE_PATH}", "the gateway's /v1/tokenize", "exact token counts with the model's own template"),
)


def render_flags_doc() -> str:
    """docs/llama-server-flags.md: FLAGS and ENDPOINTS as tables (`clawbot docs` writes it; a test checks it)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        "# llama-server flags",
        "",
        "<!-- Generated by `clawbot docs` from clawbot.model.engines.llama_server.FLAGS. Do not edit by hand. -->",
        "",
        f"The command line the supervisor starts llama-server with (llama.cpp vendored in llama-cpp-python "
        f"{build.LLAMA_CPP_PYTHON_VERSION}, built by `clawbot build-engine`), in this order. Values named "
        "`RunPlan.*` are decided by the run plan (clawbot.model.runplan) from clawbot.json and the node's facts; "
        "`GET /status` on the gateway shows the plan with a reason for each value, and the command line.",
        "",
        "| flag | value from | why |",
        "| --- | --- | --- |",
    ]
    lines += [f"| `{cell(f.flag)}` | {cell(f.source)} | {cell(f.why)} |" for f in FLAGS]
    lines += ["", "## Endpoints clawbot uses", "", "| endpoint | used by | for |", "| --- | --- | --- |"]
    lines += [f"| `{cell(path)}` | {cell(who)} | {cell(why)} |" for path, who, why in ENDPOINTS]
    lines += ["", "Every other endpoint (`/slots`, `/props`, `/metrics`, ...) stays on loopback: the gateway "
                  "forwards an allowlist only."]
    lines += ["", "## Control tokens and stop strings", "",
              "clawbot never passes `--special` (`-sp`): llama-server then renders control tokens (`<start_of_turn>`, "
              "`<eos>`, ...) as empty text, so none reaches a client, and it stops by itself on the model's "
              "end-of-generation tokens. A marker a model spells out of ordinary tokens, or a transcript template's "
              "next turn (`USER:`), only a stop string catches: the gateway adds those to every chat completion "
              "(the template's turn markers and the model's end tokens as text, then `model_server.stop_sequences`; "
              "`GET /status` lists them as `model.stop_sequences`), rather than `-r` here, which a request's own "
              "`stop` would replace."]
    return "\n".join(lines) + "\n"
