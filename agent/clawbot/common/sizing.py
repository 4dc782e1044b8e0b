"""Exact memory fit of a GGUF model under llama.cpp: the one sizing computation clawbot uses.

preflight, the hugepages role and the GPU-layer defaults all call this module, so a node is refused,
given huge pages or given GPU layers from the same numbers. Everything is a pure function of the GGUF
header and the run parameters (no llama.cpp needed), so deploy can size a host from its declared memory.

How llama.cpp (as vendored in llama-cpp-python 0.3.36) lays out memory, read from its source and
checked against its load log (tests/test_sizing.py):

* Weights: every tensor's bytes, mmap'd from the file (``CPU_Mapped model buffer``).
* KV cache: ``-c`` (n_ctx) is the TOTAL number of cells for all slots, not per slot. n_ctx is first
  rounded up to a multiple of 256. With a unified cache (``--kv-unified``; llama-server's default only
  when ``-np`` is left on auto) there is one stream of n_ctx cells shared by all slots. Otherwise each of
  the n_parallel slots gets its own stream of ``pad256(n_ctx / n_parallel)`` cells, so the total is
  n_parallel × that (which can exceed the padded n_ctx). So ``-np 4 -c 4096`` allocates 4096 cells
  (4 × 1024), not 4 × 4096. Per layer: K = row_size(type_k, head_dim_k × n_head_kv) × cells and
  V likewise; row_size is ggml's block math (f16: 2 bytes/value, q8_0: 34 bytes/32, q4_0: 18 bytes/32).
* Compute buffer: one reserved worst-case graph of n_ubatch tokens (see ``compute_buffer_bytes``).
* Output buffer: logits for n_parallel sequences (n_vocab × 4 bytes each), tiny.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1 << 20
GIB = 1 << 30
HUGEPAGE_BYTES = 2 * MIB
KV_CELL_PADDING = 256  # llama_context: cparams.n_ctx = GGML_PAD(n_ctx, 256)
DEFAULT_UBATCH = 512

# ggml type id -> (values per block, bytes per block); the subset GGUF weights and KV caches use.
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
}

# KV cache types accepted by llama.cpp's --cache-type-k/-v, with their ggml ids.
CACHE_TYPES: dict[str, int] = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3,
                               "q5_0": 6, "q5_1": 7, "iq4_nl": 20}


def row_bytes(ggml_type: int, n_values: int) -> int:
    """ggml_row_size: bytes of n_values stored as ggml_type (n_values must fill whole blocks)."""
    block_values, block_bytes = GGML_BLOCKS[ggml_type]
    if n_values % block_values:
        raise ValueError(f"{n_values} values do not fill whole blocks of {block_values} (ggml type {ggml_type})")
    return n_values // block_values * block_bytes


# --- GGUF header -------------------------------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_SMALL_ARRAY = 64  # arrays up to this many items are kept; longer ones (token lists) only counted


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml ne order: ne[0] (row length) first
    ggml_type: int
    offset: int  # relative to the data section

    @property
    def n_elements(self) -> int:
        return math.prod(self.dims)

    @property
    def n_bytes(self) -> int:
        return row_bytes(self.ggml_type, self.dims[0]) * math.prod(self.dims[1:])


@dataclass(frozen=True)
class GgufHeader:
    metadata: dict[str, object]  # long arrays appear as ("array", length)
    tensors: list[TensorInfo]
    data_offset: int
    file_bytes: int


def read_gguf_header(path: str | os.PathLike[str]) -> GgufHeader:
    """Parse a GGUF's metadata and tensor infos without touching tensor data.

    gguf.GGUFReader builds a numpy view for every token string and takes ~9 s on a 128k-token vocabulary
    (2 cores); preflight must finish in seconds, so this walks the header directly and only counts long
    arrays. tests/test_sizing.py checks it against GGUFReader.
    """
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 0

        def take(fmt: str):
            nonlocal pos
            value = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return value[0]

        def take_string() -> str:
            nonlocal pos
            length = take("<Q")
            text = bytes(buf[pos:pos + length]).decode("utf-8", errors="replace")
            pos += length
            return text

        def take_value(value_type: int):
            nonlocal pos
            if value_type in _SCALARS:
                return take(_SCALARS[value_type])
            if value_type == _STRING:
                return take_string()
            if value_type == _ARRAY:
                item_type, count = take("<I"), take("<Q")
                if count <= _SMALL_ARRAY:
                    return [take_value(item_type) for _ in range(count)]
                if item_type in _SCALARS:
                    pos += count * struct.calcsize(_SCALARS[item_type])
                else:
                    for _ in range(count):
                        take_value(item_type)
                return ("array", count)
            raise ValueError(f"{path}: unknown GGUF value type {value_type} at byte {pos}")

        if bytes(buf[:4]) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
        pos = 4
        version = take("<I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old (need 2 or 3)")
        n_tensors, n_kv = take("<Q"), take("<Q")
        metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = take_string()
            metadata[key] = take_value(take("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = take_string()
            n_dims = take("<I")
            dims = tuple(take("<Q") for _ in range(n_dims))
            ggml_type = take("<I")
            tensors.append(TensorInfo(name, dims, ggml_type, take("<Q")))
        alignment = int(metadata.get("general.alignment", 32))
        data_offset = (pos + alignment - 1) // alignment * alignment
        return GgufHeader(metadata, tensors, data_offset, len(buf))


# --- model facts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What sizing needs from a GGUF: hyper-parameters and where its bytes are."""

    path: str
    architecture: str
    name: str
    file_bytes: int
    tensor_bytes: int  # the weights llama.cpp maps (sum of tensor infos)
    n_params: int
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: int
    n_vocab: int
    n_expert: int
    layer_bytes: tuple[int, ...]  # weights of blk.N, for GPU offload splits
    output_bytes: int  # output head + output_norm as placed on a GPU (a tied head is a copy of token_embd)
    input_bytes: int  # token embeddings: always stay in host memory in llama.cpp

    @property
    def n_embd_k_gqa(self) -> int:
        return self.head_dim_k * self.n_head_kv

    @property
    def n_embd_v_gqa(self) -> int:
        return self.head_dim_v * self.n_head_kv


def _meta_int(metadata: dict[str, object], key: str, default: int | None = None) -> int:
    value = metadata.get(key, default)
    if value is None:
        raise ValueError(f"GGUF metadata lacks {key}")
    if isinstance(value, list):  # per-layer arrays (e.g. head_count_kv): sizing uses the largest
        value = max(value)
    return int(value)


def model_info_from_header(header: GgufHeader, path: str = "") -> ModelInfo:
    """ModelInfo from a parsed header (pure: usable on headers read elsewhere)."""
    meta = header.metadata
    arch = str(meta.get("general.architecture", "llama"))
    n_embd = _meta_int(meta, f"{arch}.embedding_length")
    n_head = _meta_int(meta, f"{arch}.attention.head_count")
    n_head_kv = _meta_int(meta, f"{arch}.attention.head_count_kv", n_head)
    head_dim_default = n_embd // n_head if n_head else 0
    layer_bytes: dict[int, int] = {}
    output_bytes = input_bytes = 0
    for tensor in header.tensors:
        if tensor.name.startswith("blk."):
            index = int(tensor.name.split(".")[1])
            layer_bytes[index] = layer_bytes.get(index, 0) + tensor.n_bytes
        elif tensor.name.startswith("token_embd"):
            input_bytes += tensor.n_bytes
        else:
            output_bytes += tensor.n_bytes
    if not any(t.name == "output.weight" for t in header.tensors):
        output_bytes += input_bytes  # tied embeddings: llama.cpp duplicates token_embd for the output head
    n_layer = _meta_int(meta, f"{arch}.block_count")
    tokens = meta.get("tokenizer.ggml.tokens")
    token_count = tokens[1] if isinstance(tokens, tuple) else len(tokens or [])
    return ModelInfo(
        path=path, architecture=arch, name=str(meta.get("general.name", Path(path).stem)),
        file_bytes=header.file_bytes,
        tensor_bytes=sum(t.n_bytes for t in header.tensors),
        n_params=sum(t.n_elements for t in header.tensors),
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        n_ff=_meta_int(meta, f"{arch}.feed_forward_length", 4 * n_embd),
        head_dim_k=_meta_int(meta, f"{arch}.attention.key_length", head_dim_default),
        head_dim_v=_meta_int(meta, f"{arch}.attention.value_length", head_dim_default),
        n_ctx_train=_meta_int(meta, f"{arch}.context_length", 4096),
        n_vocab=_meta_int(meta, f"{arch}.vocab_size", token_count),
        n_expert=_meta_int(meta, f"{arch}.expert_count", 0),
        layer_bytes=tuple(layer_bytes.get(i, 0) for i in range(n_layer)),
        output_bytes=output_bytes, input_bytes=input_bytes,
    )


def read_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    return model_info_from_header(read_gguf_header(path), str(path))


# --- KV cache ------------------------------------------------------------------------------------------


def _pad(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class KvCacheSize:
    """The KV cache llama.cpp allocates for -c n_ctx -np n_parallel (see module docstring)."""

    n_ctx_requested: int  # the -c value (total for all slots)
    n_parallel: int
    unified: bool
    n_streams: int
    cells_per_stream: int
    cells_total: int
    cells_per_slot: int  # the context one conversation can use (a unified cache lets one slot take all)
    cache_type_k: str
    cache_type_v: str
    k_bytes: int
    v_bytes: int
    bytes_per_layer: int

    @property
    def total_bytes(self) -> int:
        return self.k_bytes + self.v_bytes


def kv_cache_size(info: ModelInfo, n_ctx: int, n_parallel: int = 1, cache_type_k: str = "f16",
                  cache_type_v: str = "f16", unified: bool = False) -> KvCacheSize:
    """llama_context + llama_kv_cache arithmetic: padding, streams and per-layer K/V rows."""
    if n_parallel < 1:
        raise ValueError("n_parallel must be >= 1")
    for cache_type in (cache_type_k, cache_type_v):
        if cache_type not in CACHE_TYPES:
            raise ValueError(f"unknown cache type {cache_type!r}; choose one of {', '.join(CACHE_TYPES)}")
    n_ctx_padded = _pad(n_ctx if n_ctx > 0 else info.n_ctx_train, KV_CELL_PADDING)
    if unified:
        n_streams, cells_per_stream = 1, n_ctx_padded
    else:
        n_streams, cells_per_stream = n_parallel, _pad(n_ctx_padded // n_parallel, KV_CELL_PADDING)
    cells_total = n_streams * cells_per_stream
    k_row = row_bytes(CACHE_TYPES[cache_type_k], info.n_embd_k_gqa)
    v_row = row_bytes(CACHE_TYPES[cache_type_v], info.n_embd_v_gqa)
    return KvCacheSize(
        n_ctx_requested=n_ctx, n_parallel=n_parallel, unified=unified, n_streams=n_streams,
        cells_per_stream=cells_per_stream, cells_total=cells_total, cells_per_slot=cells_per_stream,
        cache_type_k=cache_type_k, cache_type_v=cache_type_v,
        k_bytes=k_row * cells_total * info.n_layer, v_bytes=v_row * cells_total * info.n_layer,
        bytes_per_layer=(k_row + v_row) * cells_total,
    )


# --- compute buffer ------------------------------------------------------------------------------------


def compute_buffer_bytes(info: ModelInfo, kv: KvCacheSize, n_ubatch: int = DEFAULT_UBATCH,
                         flash_attn: bool = False) -> int:
    """Estimate of llama.cpp's CPU compute buffer: the reserved worst-case prompt graph.

    The reserve graph processes T = min(n_ctx, n_ubatch) tokens and outputs all of them. ggml-alloc
    frees a tensor after its last use, so the buffer is the largest set of tensors alive at one time;
    the KQ mask (N × T cells of one stream: f32, or f16 with flash attention) lives throughout.
    The peak is the largest of three phases (f32 activations, E = n_embd, F = n_ff, H = heads):
      * attention: scores KQ  N × T × H  (none with flash attention) + residual, norm, Q, K, V
        ≈ (4 E + 2 E_kv) × T;
      * feed-forward: gate, up and their product  3 F × T  + 4 E × T;
      * output: logits  n_vocab × T  + final hidden  E × T.
    Calibrated against llama.cpp's "CPU compute buffer size" log line (tests/test_sizing.py, and
    the table in the final report): within a few percent when one phase dominates, and a slight
    over-estimate (up to ~25 %) for toy models where every phase is tiny.
    """
    tokens = min(kv.cells_total, n_ubatch)
    cells = kv.cells_per_stream
    f32 = 4
    mask = cells * tokens * (2 if flash_attn else f32)
    scores = 0 if flash_attn else cells * tokens * info.n_head * f32
    attention = scores + (4 * info.n_embd + 2 * info.n_embd_k_gqa) * tokens * f32
    feed_forward = (3 * info.n_ff + 4 * info.n_embd) * tokens * f32
    output = (info.n_vocab + info.n_embd) * tokens * f32
    return mask + max(attention, feed_forward, output)


# --- the fit -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryFit:
    """All byte counts for running one model with one set of run parameters."""

    model: ModelInfo
    kv: KvCacheSize
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    output_bytes: int  # logits buffer
    total_bytes: int
    hugepages: int  # 2 MiB pages to stage the model file on hugetlbfs (with headroom)
    n_ubatch: int = DEFAULT_UBATCH
    flash_attn: bool = False

    def describe(self) -> str:
        return (f"{gib(self.total_bytes)} (weights {gib(self.weights_bytes)} + KV {gib(self.kv_bytes)} "
                f"+ compute {gib(self.compute_bytes + self.output_bytes)})")


def gib(n_bytes: int) -> str:
    """Human size: GiB with two decimals, or MiB below 1 GiB so small models still read sensibly."""
    if abs(n_bytes) >= GIB:
        return f"{n_bytes / GIB:.2f} GiB"
    return f"{n_bytes / MIB:.1f} MiB"


HUGEPAGES_HEADROOM_MIN = 4
HUGEPAGES_HEADROOM_FRACTION = 0.01


def hugepages_headroom(pages: int) -> int:
    return max(HUGEPAGES_HEADROOM_MIN, math.ceil(pages * HUGEPAGES_HEADROOM_FRACTION))


def hugepages_for(file_bytes: int, page_bytes: int = HUGEPAGE_BYTES) -> int:
    """Pages to reserve for staging a model file on hugetlbfs.

    The staged copy is the whole file ftruncate'd to a page multiple: ceil(file / page). Headroom
    (1 %, at least 4 pages) lets a slightly larger re-quantized or re-downloaded model be staged without
    a new sysctl, and absorbs a reservation that lands a few pages short on a fragmented host.
    """
    pages = math.ceil(file_bytes / page_bytes)
    return pages + hugepages_headroom(pages)


def size_model(info: ModelInfo, n_ctx: int, n_parallel: int = 1, cache_type_k: str = "f16",
               cache_type_v: str = "f16", unified: bool = False, n_ubatch: int = DEFAULT_UBATCH,
               flash_attn: bool = False) -> MemoryFit:
    """Host memory llama.cpp needs for this model and run parameters (all on CPU). Pure function."""
    kv = kv_cache_size(info, n_ctx, n_parallel, cache_type_k, cache_type_v, unified)
    compute = compute_buffer_bytes(info, kv, n_ubatch, flash_attn)
    logits = info.n_vocab * n_parallel * 4
    total = info.tensor_bytes + kv.total_bytes + compute + logits
    return MemoryFit(model=info, kv=kv, weights_bytes=info.tensor_bytes, kv_bytes=kv.total_bytes,
                     compute_bytes=compute, output_bytes=logits, total_bytes=total,
                     hugepages=hugepages_for(info.file_bytes), n_ubatch=n_ubatch, flash_attn=flash_attn)


def max_context_per_slot(info: ModelInfo, available_bytes: int, n_parallel: int = 1,
                         cache_type_k: str = "f16", cache_type_v: str = "f16", unified: bool = False,
                         n_ubatch: int = DEFAULT_UBATCH, flash_attn: bool = False) -> int:
    """Largest context per slot (a multiple of 256, at most n_ctx_train) whose -c = that × n_parallel fits.

    0 when even 256 cells per slot do not fit.
    """
    lo, hi = 0, max(1, info.n_ctx_train // KV_CELL_PADDING)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        per_slot = mid * KV_CELL_PADDING
        fit = size_model(info, per_slot * n_parallel, n_parallel, cache_type_k, cache_type_v, unified,
                         n_ubatch, flash_attn)
        if fit.total_bytes <= available_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo * KV_CELL_PADDING


def max_parallel_slots(info: ModelInfo, context_window: int, available_bytes: int, limit: int = 16,
                       cache_type_k: str = "f16", cache_type_v: str = "f16", n_ubatch: int = DEFAULT_UBATCH,
                       flash_attn: bool = False) -> int:
    """Most slots (at most `limit`) of context_window cells each whose whole need fits in available_bytes;
    0 if not even one."""
    best = 0
    for slots in range(1, limit + 1):
        fit = size_model(info, context_window * slots, slots, cache_type_k, cache_type_v, n_ubatch=n_ubatch,
                         flash_attn=flash_attn)
        if fit.total_bytes > available_bytes:
            break
        best = slots
    return best


@dataclass(frozen=True)
class GpuSplit:
    """How many layers to offload (llama.cpp -ngl) and what that puts on the GPU."""

    n_gpu_layers: int  # n_layer + 1 means everything incl. the output head
    gpu_bytes: int
    host_bytes: int


def gpu_layers_that_fit(fit: MemoryFit, gpu_free_bytes: int, reserve_bytes: int = 512 * MIB) -> GpuSplit:
    """Most layers whose weights and KV rows fit in free GPU memory after a compute/driver reserve.

    llama.cpp puts a layer's KV on the layer's device (offload_kqv), keeps token embeddings on the host
    and offloads the output head only when -ngl exceeds n_layer.
    """
    info = fit.model
    budget = gpu_free_bytes - reserve_bytes - fit.compute_bytes
    used = 0
    layers = 0
    for layer_weights in info.layer_bytes:
        need = layer_weights + fit.kv.bytes_per_layer
        if used + need > budget:
            break
        used += need
        layers += 1
    if layers == info.n_layer and used + info.output_bytes <= budget:
        used += info.output_bytes
        layers += 1
    gpu_bytes = used + (fit.compute_bytes if layers else 0)
    return GpuSplit(n_gpu_layers=layers, gpu_bytes=gpu_bytes, host_bytes=max(0, fit.total_bytes - used))


@dataclass(frozen=True)
class FitVerdict:
    fits: bool
    need_bytes: int
    have_bytes: int
    message: str = field(default="")


def check_fit(fit: MemoryFit, available_bytes: int) -> FitVerdict:
    """Whether the model fits, with a message naming need vs have."""
    fits = fit.total_bytes <= available_bytes
    if fits:
        message = f"model needs {fit.describe()}; {gib(available_bytes)} is available"
    else:
        message = f"model needs {fit.describe()} but only {gib(available_bytes)} is available"
    return FitVerdict(fits, fit.total_bytes, available_bytes, message)


# --- one model split across nodes (llama.cpp's RPC backend) -------------------------------------------
#
# llama-server on the main node with `--rpc` (one RPC device per worker), `-ngl K` and `--tensor-split` lays the
# model out like this (llama_model_base::load_tensors, vendored llama.cpp): token embeddings stay on the main
# node; -ngl K offloads the LAST K of the n_layer + 1 "layers" (the repeating layers, then the output head), so
# the main node keeps the first n_layer - (K - 1) layers and the output head always goes with the offloaded
# part; the offloaded layers are cut between the devices in order, by the --tensor-split proportions (integer
# layer counts give exact cuts). A layer's KV cache lives on its layer's device (offload_kqv, the default).
# Each device reserves a compute buffer of its own.


@dataclass(frozen=True)
class NodeShare:
    """One node's part of a split model: which repeating layers it holds and the bytes they need there."""

    name: str
    first_layer: int
    n_layers: int
    output: bool  # holds the output head (the last worker: llama.cpp offloads it with the last layers)
    weights_bytes: int  # its layers' weights (+ token embeddings on the main node, + the output head)
    kv_bytes: int  # the KV cache rows of its layers, for every slot
    compute_bytes: int  # its compute buffer (+ the logits buffer on the main node)
    available_bytes: int | None  # the memory it offers the model; None: unknown (not checked)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.total_bytes <= self.available_bytes

    @property
    def layers(self) -> str:
        if not self.n_layers:
            return "no layers"
        last = self.first_layer + self.n_layers - 1
        return f"layer {last}" if last == self.first_layer else f"layers {self.first_layer}-{last}"

    def describe(self) -> str:
        head = " and the output head" if self.output else ""
        have = f" of {gib(self.available_bytes)}" if self.available_bytes is not None else " (its memory unknown)"
        return (f"{self.name}: {self.layers}{head}, {gib(self.total_bytes)}{have} (weights {gib(self.weights_bytes)} "
                f"+ KV {gib(self.kv_bytes)} + compute {gib(self.compute_bytes)})")

    def to_json(self) -> dict:
        return {"name": self.name, "first_layer": self.first_layer, "n_layers": self.n_layers, "output": self.output,
                "weights_bytes": self.weights_bytes, "kv_bytes": self.kv_bytes, "compute_bytes": self.compute_bytes,
                "total_bytes": self.total_bytes, "available_bytes": self.available_bytes, "fits": self.fits}


@dataclass(frozen=True)
class LayerSplit:
    """The model laid out over the main node and its RPC workers, in the order llama.cpp runs them."""

    main: NodeShare
    workers: tuple[NodeShare, ...]
    how: str  # how the cut was chosen, for /status and preflight

    @property
    def shares(self) -> tuple[NodeShare, ...]:
        return (self.main, *self.workers)

    @property
    def fits(self) -> bool:
        return all(share.fits for share in self.shares)

    @property
    def gpu_layers(self) -> int:
        """-ngl: the workers' repeating layers and the output head."""
        return sum(w.n_layers for w in self.workers) + 1

    @property
    def tensor_split(self) -> tuple[int, ...]:
        """--tensor-split: each worker's offloaded layers (the output head counts as one), in --rpc order."""
        return tuple(w.n_layers + (1 if w.output else 0) for w in self.workers)

    @property
    def total_bytes(self) -> int:
        return sum(share.total_bytes for share in self.shares)

    def describe(self) -> str:
        return "; ".join(share.describe() for share in self.shares)

    def refusal(self) -> str:
        """Which nodes cannot hold their share, with the bytes (empty when every share fits)."""
        over = [s for s in self.shares if not s.fits]
        if not over:
            return ""
        offered = sum(s.available_bytes or 0 for s in self.shares)
        parts = [f"{s.name} needs {gib(s.total_bytes)} ({s.total_bytes} bytes) for {s.layers}"
                 f"{' and the output head' if s.output else ''} but has {gib(s.available_bytes or 0)} "
                 f"({s.available_bytes} bytes)" for s in over]
        return (f"the model split over {len(self.shares)} nodes does not fit: {'; '.join(parts)}. The split needs "
                f"{gib(self.total_bytes)} in all, the nodes offer {gib(offered)}: add an RPC worker, give the nodes "
                "more memory, or lower context_window / parallel_slots")

    def to_json(self) -> dict:
        return {"how": self.how, "gpu_layers": self.gpu_layers, "tensor_split": list(self.tensor_split),
                "fits": self.fits, "nodes": [share.to_json() for share in self.shares]}


def split_layers(fit: MemoryFit, main: tuple[str, int | None], workers: list[tuple[str, int | None]]) -> LayerSplit:
    """Cut the model's layers between the main node and its RPC workers so that every node fills the same
    fraction of the memory it offers (the smallest such fraction: each node's share is in proportion to its
    memory, after what it needs whatever its share: token embeddings, compute and logits buffers on the main node,
    a compute buffer on each worker, the output head on the last). Pure.

    + fit: size_model at the run's context, slots, cache types and ubatch
    + main / workers: (name, the memory it offers in bytes or None for unknown), workers in --rpc order

    With any memory unknown the layers are dealt out evenly by count (nothing can be checked). The result's
    `fits` says whether every node can hold its share; `refusal()` says which cannot, with the bytes.
    """
    if not workers:
        raise ValueError("a split needs at least one RPC worker")
    info = fit.model
    layer_cost = [weights + fit.kv.bytes_per_layer for weights in info.layer_bytes]
    budgets = [main[1], *(w[1] for w in workers)]
    n_nodes = len(budgets)
    fixed = [info.input_bytes + fit.compute_bytes + fit.output_bytes] + [fit.compute_bytes] * len(workers)
    fixed[-1] += info.output_bytes
    if any(b is None or b <= 0 for b in budgets):
        base, extra = divmod(info.n_layer, n_nodes)
        counts = [base + (1 if i < extra else 0) for i in range(n_nodes)]
        how = ("a node's memory is unknown: layers dealt out evenly by count (not checked)"
               if any(b is None for b in budgets) else "a node offers no memory: layers dealt out evenly by count")
    else:
        counts = _balanced_counts(layer_cost, fixed, budgets)
        how = ("each node fills the same fraction of its memory (layers in proportion to the memory each offers, "
               "after its fixed buffers)")
    shares, first = [], 0
    for index, count in enumerate(counts):
        name, available = (main if index == 0 else workers[index - 1])
        layers = range(first, first + count)
        weights = sum(info.layer_bytes[i] for i in layers)
        kv = fit.kv.bytes_per_layer * count
        compute = fit.compute_bytes
        if index == 0:
            weights += info.input_bytes
            compute += fit.output_bytes
        last = index == n_nodes - 1
        if last:
            weights += info.output_bytes
        shares.append(NodeShare(name, first, count, last, weights, kv, compute, available))
        first += count
    return LayerSplit(shares[0], tuple(shares[1:]), how)


def _balanced_counts(layer_cost: list[int], fixed: list[int], budgets: list[int]) -> list[int]:
    """Contiguous layer counts per node (in order) that minimise the largest need/memory ratio: binary search on
    the ratio, each node taking as many layers as fit under it (greedy filling is optimal for contiguous cuts)."""

    def assign(ratio: float) -> list[int] | None:
        counts, layer = [], 0
        for index, (budget, base) in enumerate(zip(budgets, fixed)):
            cap = ratio * budget - base
            if cap < 0:
                return None
            used, count = 0, 0
            last = index == len(budgets) - 1
            while layer < len(layer_cost) and (last or used + layer_cost[layer] <= cap):
                used += layer_cost[layer]
                layer += 1
                count += 1
            if last and used > cap:
                return None
            counts.append(count)
        return counts

    low, high = 0.0, (sum(layer_cost) + sum(fixed)) / max(1, min(budgets)) + 1.0
    best = assign(high)
    for _ in range(64):
        mid = (low + high) / 2
        found = assign(mid)
        if found is None:
            low = mid
        else:
            high, best = mid, found
    assert best is not None
    return best
