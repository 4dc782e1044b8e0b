"""The run plan: how the model server will run on one node, decided once, from clawbot.json and that node's facts.

Deploy (preflight, facts read over SSH) and the supervisor (facts read on the node) both call
`RunPlan.resolve`, so given the same facts preflight judges the slots the model server gets, and the gateway
admits no more requests at once than those slots. One fact only the node learns: whether staging the weights
into huge pages succeeded (HostFacts.weights_staged); the supervisor then resolves again, and the staged
weights no longer count against free memory, so a CPU node with staged weights may get more auto slots than
preflight judged (never fewer). Every field carries the reason for its value, which /status and
`clawbot preflight` show. Pure: no I/O; the facts come in as `HostFacts`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Generic, TypeVar

from clawbot.common import sizing
from clawbot.model.engines import Engine, engine_for

if TYPE_CHECKING:
    from clawbot.common.preflight import GpuFacts

GPU_UBATCH = 1024

T = TypeVar("T")


@dataclass(frozen=True)
class Decision(Generic[T]):
    """A value of the plan and why it is that value (shown in /status and by `clawbot preflight`)."""

    value: T
    reason: str


@dataclass(frozen=True)
class HostFacts:
    """What a node offers the model server. preflight.host_facts builds it from a node read locally
    (the supervisor, `clawbot preflight`) or over SSH (deploy)."""

    gpus: tuple[GpuFacts, ...]
    host_free_bytes: int | None  # the memory the model may use (MemAvailable or cgroup headroom); None: unknown
    usable_cores: int | None  # None: not read here; the node counts them when the server starts
    memlock_limit: int  # bytes the model server may pin with mlock (preflight.UNLIMITED for no limit)
    engine_builds: frozenset[str] | None = None  # accelerators with a build of the engine; None: not a question
    weights_staged: bool = False  # the weights sit in huge pages, which host_free_bytes no longer counts
    # model_server.split: the free memory each RPC worker's ggml-rpc-server reported through its tunnel (the
    # supervisor's probe before each start), by worker name; a worker whose memory_mib deploy measured uses that
    rpc_free_bytes: tuple[tuple[str, int], ...] = ()
    node_name: str = "this node"  # how reports name this node (deploy and `clawbot validate` know its inventory name)

    def can_mlock(self, n_bytes: int) -> bool:
        return self.memlock_limit >= n_bytes


def counts_flash_attention(flash_attention: str) -> bool:
    """Whether sizing counts flash attention for an -fa value: `auto` counts as on, because llama.cpp turns it
    on wherever the backend has the op (the CPU backend does). The one rule for every size clawbot computes."""
    return flash_attention != "off"


def configured_slots(config: dict) -> Decision[int] | None:
    """The slots clawbot.json alone decides (the engine's own limit, or model_server.parallel_slots);
    None for auto, which the node's memory decides."""
    server = config["model_server"]
    engine = engine_for(server["engine"])
    limit = engine.MAX_SLOTS
    if limit is not None and (server["parallel_slots"] == 0 or server["parallel_slots"] > limit):
        return Decision(limit, engine.MAX_SLOTS_WHY)
    if server["parallel_slots"]:
        return Decision(server["parallel_slots"], "model_server.parallel_slots")
    return None


@dataclass(frozen=True)
class RunPlan:
    accelerator: Decision[str]  # what the engine build runs on: cpu, cuda, vulkan, rocm
    gpu_layers: Decision[str]  # -ngl: "all" or a layer count
    flash_attention: Decision[str]  # -fa: on, off, or auto (llama.cpp decides per backend)
    slots: Decision[int]  # -np: conversations decoded together, context_window KV cells each
    ubatch: Decision[int]  # -ub: prompt tokens evaluated in one pass
    threads: Decision[int]  # -t
    load_mode: Decision[str]  # -lm: mmap, mlock, mmap+mlock or none
    staging: Decision[bool]  # copy the weights into huge pages before the start
    # model_server.split: the layers cut between this node and its RPC workers (-ngl, --tensor-split); None: no split
    split: Decision[sizing.LayerSplit | None] = Decision(None, "model_server.split.workers is empty: no split")
    # model_server.speculative: off, ngram, or the path of a draft GGUF
    speculative: Decision[str] = Decision("off", "model_server.speculative is off")

    def gateway_concurrency(self, max_concurrency: int) -> int:
        """Requests the gateway passes on at once: a request beyond the slots would wait inside the model
        server, out of the queue's sight (no Retry-After, no queue timeout)."""
        return min(max_concurrency, self.slots.value)

    def to_json(self) -> dict:
        def plain(value):
            return value.to_json() if hasattr(value, "to_json") else value

        return {f.name: {"value": plain(getattr(self, f.name).value), "reason": getattr(self, f.name).reason}
                for f in fields(self)}

    @classmethod
    def resolve(cls, config: dict, facts: HostFacts, model_info: sizing.ModelInfo | None) -> RunPlan:
        """The plan for a checked clawbot.json on a node with these facts. model_info None: the model could not
        be sized (slots fall back to max_concurrency, a -1 offload to all layers; preflight refuses it first)."""
        server = config["model_server"]
        engine = engine_for(server["engine"])
        accelerator = _accelerator(server["accelerator"], facts.gpus, facts.engine_builds, engine.NAME)
        on_gpu = accelerator.value != "cpu"
        flash = _flash_attention(server["flash_attention"], accelerator.value, engine)
        ubatch = _ubatch(server, on_gpu)
        gpu_free = max(g.memory_free for g in facts.gpus) if accelerator.value == "cuda" and facts.gpus else None
        sizer = _Sizer(config, model_info, ubatch.value, counts_flash_attention(flash.value))
        if split_workers(config):
            slots = configured_slots(config) or _split_slots(config, sizer, facts)
            split = _split(config, sizer, slots.value, facts)
            gpu_layers = _split_gpu_layers(split)
        else:
            slots = configured_slots(config) or _auto_slots(config, sizer, on_gpu, gpu_free, facts)
            split = Decision(None, "model_server.split.workers is empty: no split")
            gpu_layers = _gpu_layers(server["gpu_layers"], on_gpu, gpu_free, sizer, slots.value)
        return cls(
            accelerator=accelerator,
            gpu_layers=gpu_layers,
            flash_attention=flash,
            slots=slots,
            ubatch=ubatch,
            threads=_threads(server["threads"], facts.usable_cores),
            load_mode=_load_mode(server["load_mode"], model_info.file_bytes if model_info else 0, facts),
            staging=_split_staging() if split_workers(config) else _staging(server["hugepages"], gpu_layers.value,
                                                                           model_info),
            split=split,
            speculative=_speculative(server.get("speculative", "off"), accelerator.value, engine,
                                     bool(split_workers(config))),
        )


def split_workers(config: dict) -> list[dict]:
    """model_server.split.workers: the RPC workers this node's llama-server uses, in layer order (empty: no split)."""
    return list(config["model_server"].get("split", {}).get("workers", []))


def uses_nvidia_gpus(configured: str) -> bool:
    """Whether model_server.accelerator can pick an NVIDIA GPU (so nvidia-smi is worth asking)."""
    return configured in ("auto", "cuda")


def node_accelerator(configured: str, gpus) -> str:
    """The accelerator a node's agent will run (`auto` decided by the GPUs nvidia-smi lists there), before
    checking which engine builds it has: deploy asks this to know which build a node needs, and the supervisor
    which builds to look for, so both decide by the same rule."""
    return _accelerator(configured, tuple(gpus)).value


# --------------------------------------------------------------------------- the decisions


def _accelerator(configured: str, gpus, engine_builds: frozenset[str] | None = None,
                 engine_name: str = "") -> Decision[str]:
    """`auto`: CUDA where nvidia-smi lists a GPU, else the CPU; a build the node lacks (engine_builds, None: not
    a question) falls back to the CPU build."""
    if configured == "auto":
        wanted, why = ("cuda", f"auto: nvidia-smi lists {len(gpus)} GPU(s)") if gpus \
            else ("cpu", "auto: nvidia-smi lists no GPU")
    else:
        wanted, why = configured, f"model_server.accelerator is {configured}"
    if wanted != "cpu" and engine_builds is not None and wanted not in engine_builds:
        return Decision("cpu", f"{why}, but this node has no {wanted} build of {engine_name}: the CPU build")
    return Decision(wanted, why)


def _flash_attention(configured: str, accelerator: str, engine: Engine) -> Decision[str]:
    """`auto` is on for CUDA (measured on an H100: faster prefill and a smaller KV working set, see
    benchmarks/results/gpu.json); elsewhere the engine's own rule for `auto`."""
    if configured != "auto":
        return Decision(configured, f"model_server.flash_attention is {configured}")
    if accelerator == "cuda":
        return Decision("on", "auto: on with the CUDA engine (faster prefill, measured on an H100)")
    value, why = engine.AUTO_FLASH_ATTENTION
    return Decision(value, f"auto: {why}")


def _ubatch(server: dict, on_gpu: bool) -> Decision[int]:
    """model_server.ubatch_size, or for 0 (auto) 1024 when layers run on a GPU and llama.cpp's 512 on a CPU.

    Measured on an H100 (benchmarks/results/gpu.json): a 540-token chat prompt's first token took 57.0 ms at
    -ub 1024 against 60.4 ms at 512 (one pass instead of two); a CPU gains nothing from it, and the compute
    buffer grows with it (sizing.compute_buffer_bytes counts that)."""
    if server["ubatch_size"]:
        return Decision(server["ubatch_size"], "model_server.ubatch_size")
    if on_gpu and server["gpu_layers"] != 0:
        return Decision(GPU_UBATCH, "auto: layers run on the GPU, where a whole chat prompt in one pass is faster")
    return Decision(sizing.DEFAULT_UBATCH, "auto: llama.cpp's default on a CPU")


@dataclass(frozen=True)
class _Sizer:
    """sizing.size_model at this config's context, cache types, ubatch and flash attention, for n slots."""

    config: dict
    info: sizing.ModelInfo | None
    ubatch: int
    flash_attn: bool

    def fit(self, slots: int) -> sizing.MemoryFit:
        assert self.info is not None
        server = self.config["model_server"]
        return sizing.size_model(self.info, self.config["context_window"] * slots, slots, server["cache_type_k"],
                                 server["cache_type_v"], n_ubatch=self.ubatch, flash_attn=self.flash_attn)

    def offloads_everything(self, slots: int, gpu_free: int) -> bool:
        assert self.info is not None
        return sizing.gpu_layers_that_fit(self.fit(slots), gpu_free).n_gpu_layers > self.info.n_layer


def _auto_slots(config: dict, sizer: _Sizer, on_gpu: bool, gpu_free: int | None, facts: HostFacts) -> Decision[int]:
    """parallel_slots 0: model_gateway.max_concurrency slots (the gateway never sends more at once) when their
    KV cache fits the memory left after the weights, else the most that fit, at least 1. That memory is the
    GPU's when the whole model is offloaded, else the host's (staged weights sit outside it). Unknown memory
    or an unsized model: max_concurrency."""
    wanted = config["model_gateway"]["max_concurrency"]
    info = sizer.info
    if info is None:
        return Decision(wanted, "auto: model_gateway.max_concurrency (the model could not be sized)")
    gpu_layers = config["model_server"]["gpu_layers"]
    whole_model_on_gpu = on_gpu and (gpu_layers < 0 or gpu_layers > info.n_layer)
    if whole_model_on_gpu and gpu_free is not None and sizer.offloads_everything(1, gpu_free):
        n = next(n for n in range(wanted, 0, -1) if sizer.offloads_everything(n, gpu_free))
        return Decision(n, f"auto: {n} of max_concurrency {wanted} slots fit in the GPU's {sizing.gib(gpu_free)} "
                           f"free ({sizing.gib(sizer.fit(1).kv_bytes)} of KV cache each)")
    if facts.host_free_bytes is None:
        return Decision(wanted, "auto: model_gateway.max_concurrency (free memory unknown)")
    budget = facts.host_free_bytes + (info.tensor_bytes if facts.weights_staged else 0)
    server = config["model_server"]
    n = sizing.max_parallel_slots(info, config["context_window"], budget, wanted, server["cache_type_k"],
                                  server["cache_type_v"], n_ubatch=sizer.ubatch, flash_attn=sizer.flash_attn)
    if n:
        staged = " (the weights staged in huge pages outside it)" if facts.weights_staged else ""
        return Decision(n, f"auto: {n} of max_concurrency {wanted} slots fit in {sizing.gib(facts.host_free_bytes)} "
                           f"of free memory{staged} ({sizing.gib(sizer.fit(1).kv_bytes)} of KV cache each)")
    return Decision(1, f"auto: not even one slot of context_window {config['context_window']} fits in "
                       f"{sizing.gib(facts.host_free_bytes)} of free memory; running 1 (preflight refuses this)")


def _gpu_layers(configured: int, on_gpu: bool, gpu_free: int | None, sizer: _Sizer, slots: int) -> Decision[str]:
    """-ngl. -1 means "as many as fit": `all` when the whole model (weights, output head, KV cache of every
    slot, compute buffer) fits in the GPU's free memory, else the most layers that fit (the rest run on the
    CPU). Unknown free memory or an unsized model: `all` (preflight checks the fit before a rollout)."""
    if not on_gpu:
        return Decision("0", "the CPU build offloads nothing")
    if configured >= 0:
        return Decision(str(configured), f"model_server.gpu_layers is {configured}")
    if gpu_free is None:
        return Decision("all", "model_server.gpu_layers -1, the GPU's free memory unknown: every layer")
    if sizer.info is None:
        return Decision("all", "model_server.gpu_layers -1, the model could not be sized: every layer")
    fit = sizer.fit(slots)
    split = sizing.gpu_layers_that_fit(fit, gpu_free)
    if split.n_gpu_layers > sizer.info.n_layer:
        return Decision("all", f"model_server.gpu_layers -1: the whole model ({sizing.gib(fit.total_bytes)} with "
                               f"{slots} slots) fits in the GPU's {sizing.gib(gpu_free)} free")
    return Decision(str(split.n_gpu_layers), f"model_server.gpu_layers -1: {split.n_gpu_layers} of "
                                             f"{sizer.info.n_layer} layers fit in the GPU's {sizing.gib(gpu_free)} "
                                             "free, the rest run on the CPU")


def _threads(configured: int, usable_cores: int | None) -> Decision[int]:
    """0 means: every core this process may use but one, which the gateway keeps.

    Measured on 2 cores: llama.cpp with -t 2 next to a busy gateway made 11-20 tok/s, with -t 1 108-123 tok/s
    (its threads spin-wait for each other, so one preempted thread stalls all of them). On 16 cores (the H200 host,
    Llama-3-8B Q4_0 on the CPU, benchmarks/results/gpu-h200-cpu.md): llama-bench alone decodes fastest at 16 threads
    (25.1 tok/s, 15: 22.1), but llama-server behind the gateway decoded one stream at 22.1 tok/s with -t 15 and 17.8
    with -t 16, and raw llama-server at -t 16 made 17.9 (its own HTTP thread and the client take cores from the
    spinning workers); 4 streams made 18.9 vs 21.1 tok/s (one round). So the one core stays free."""
    if configured > 0:
        return Decision(configured, "model_server.threads")
    if usable_cores is None:
        return Decision(0, "model_server.threads 0: every usable core but one, counted on the node")
    return Decision(max(1, usable_cores - 1), f"model_server.threads 0: {usable_cores} usable cores but the "
                                              "one the gateway keeps")


# What `speculative: auto` turns on, per accelerator, and the measurement behind it (benchmarks/results/
# gpu-h200-speculative.md). A value here must be what a measurement on that accelerator supports.
AUTO_SPECULATIVE: dict[str, tuple[str, str]] = {
    "cuda": ("off", "auto: off on GPUs: measured on an H200 (benchmarks/results/gpu-h200-speculative.md), n-gram "
                    "lookup paid only on replies that repeat themselves (random weights), ngram-simple found no drafts "
                    "and cost 1.4 %, a draft model that predicts badly made decoding 7x slower: nothing measured "
                    "supports it for every reply"),
    "cpu": ("off", "auto: off on CPUs: measured on 16 cores (the H200 host) and on 2 cores with Gemma 3 270M "
                   "(benchmarks/results/gpu-h200-speculative.md), n-gram lookup paid only where the reply repeats "
                   "its prompt or itself: nothing measured supports it for every reply"),
}
AUTO_SPECULATIVE_UNMEASURED = "auto: off, speculative decoding was not measured on {accelerator}"


def _speculative(configured: str, accelerator: str, engine: Engine, split: bool) -> Decision[str]:
    """model_server.speculative: `off`; `ngram` (lookup in the conversation's own tokens); a draft GGUF's path;
    `auto`: AUTO_SPECULATIVE for this accelerator, which holds only what a measurement supports."""
    if configured == "off":
        return Decision("off", "model_server.speculative is off")
    if not getattr(engine, "SPECULATIVE", False):
        return Decision("off", f"model_server.speculative is {configured}, but {engine.NAME} is not started with "
                               "speculative decoding (llama-server engine only)")
    if configured == "auto":
        value, why = AUTO_SPECULATIVE.get(accelerator, ("off", AUTO_SPECULATIVE_UNMEASURED.format(
            accelerator=accelerator)))
        return Decision(value, why)
    if configured == "ngram":
        return Decision("ngram", "model_server.speculative is ngram: n-gram lookup in the conversation's tokens")
    if split:
        return Decision("off", f"model_server.speculative names a draft model ({configured}), but with "
                               "model_server.split its layers would go to the RPC workers, which sizing does not "
                               "count: off")
    return Decision(configured, f"model_server.speculative: draft model {configured} "
                                f"({'on the GPU' if accelerator != 'cpu' else 'on the CPU'})")


def _load_mode(configured: str, model_bytes: int, facts: HostFacts) -> Decision[str]:
    """The schema's `auto`: mmap+mlock when mlock is allowed for the whole model, else mmap."""
    if configured != "auto":
        return Decision(configured, f"model_server.load_mode is {configured}")
    if facts.can_mlock(model_bytes):
        return Decision("mmap+mlock", "auto: the memlock limit allows pinning the whole model")
    return Decision("mmap", f"auto: the memlock limit ({sizing.gib(facts.memlock_limit)}) is below the model's "
                            f"{sizing.gib(model_bytes)}")


def _staging(setting: str, gpu_layers: str, info: sizing.ModelInfo | None) -> Decision[bool]:
    """The schema's `model_server.hugepages`: `auto` stages unless every layer is offloaded to a GPU (then the
    weights are read once into VRAM and host-side huge pages buy nothing). gpu_layers: the plan's -ngl."""
    if setting == "stage":
        return Decision(True, "model_server.hugepages is stage")
    if setting in ("off", "reserve"):
        return Decision(False, f"model_server.hugepages is {setting}: the model server maps the on-disk file")
    if gpu_layers == "0":
        return Decision(True, "model_server.hugepages is auto and every layer runs on the CPU")
    if gpu_layers == "all" or (info is not None and int(gpu_layers) >= info.n_layer):
        return Decision(False, "model_server.hugepages is auto and every layer is offloaded to the GPU")
    return Decision(True, "model_server.hugepages is auto and some layers stay on the CPU")


# --------------------------------------------------------------------------- a split across RPC workers


def _worker_memory(config: dict, facts: HostFacts) -> list[tuple[str, int | None]]:
    """(name, bytes) each worker offers: deploy's measurement (memory_mib), else what its ggml-rpc-server reported
    through the tunnel before this start, else unknown."""
    reported = dict(facts.rpc_free_bytes)
    out = []
    for worker in split_workers(config):
        mib = worker.get("memory_mib", 0)
        out.append((worker["name"], mib * sizing.MIB if mib else reported.get(worker["name"])))
    return out


def _cut(config: dict, sizer: _Sizer, slots: int, facts: HostFacts) -> sizing.LayerSplit:
    return sizing.split_layers(sizer.fit(slots), (facts.node_name, facts.host_free_bytes), _worker_memory(config, facts))


def _split_slots(config: dict, sizer: _Sizer, facts: HostFacts) -> Decision[int]:
    """parallel_slots 0 with a split: the most slots up to max_concurrency whose KV cache, cut with the layers,
    still lets every node hold its share; at least 1."""
    wanted = config["model_gateway"]["max_concurrency"]
    if sizer.info is None:
        return Decision(wanted, "auto: model_gateway.max_concurrency (the model could not be sized)")
    for n in range(wanted, 0, -1):
        cut = _cut(config, sizer, n, facts)
        if cut.fits:
            checked = "" if all(s.available_bytes is not None for s in cut.shares) else " (a node's memory unknown)"
            return Decision(n, f"auto: {n} of max_concurrency {wanted} slots fit the split{checked} "
                               f"({sizing.gib(sizer.fit(n).kv_bytes)} of KV cache in all, cut with the layers)")
    return Decision(1, f"auto: not even one slot of context_window {config['context_window']} fits the split; "
                       "running 1 (preflight refuses this)")


def _split(config: dict, sizer: _Sizer, slots: int, facts: HostFacts) -> Decision[sizing.LayerSplit | None]:
    names = ", ".join(w["name"] for w in split_workers(config))
    if sizer.info is None:
        return Decision(None, f"model_server.split: workers {names}, but the model could not be sized: llama.cpp "
                              "cuts the layers by the free memory the workers report")
    cut = _cut(config, sizer, slots, facts)
    return Decision(cut, f"model_server.split: {facts.node_name} and {names}; {cut.how}")


def _split_gpu_layers(split: Decision[sizing.LayerSplit | None]) -> Decision[str]:
    """-ngl with a split: llama.cpp offloads the last -ngl of its n_layer + 1 layers (the output head counts as one)
    to the RPC devices; the first layers stay on this node's CPU."""
    if split.value is None:
        return Decision("all", "model_server.split: every layer on the RPC workers (the model could not be sized)")
    cut = split.value
    on_workers = cut.gpu_layers - 1
    return Decision(str(cut.gpu_layers), f"model_server.split: {on_workers} layers and the output head on the RPC "
                                         f"workers, the first {cut.main.n_layers} on this node")


def _split_staging() -> Decision[bool]:
    return Decision(False, "model_server.split: this node holds only its share of the weights; a copy in huge pages "
                           "would hold the whole file")

