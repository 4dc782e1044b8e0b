"""Shape-faithful random-weight llama GGUFs: real model sizes for tests and benchmarks, no downloads.

The weights are noise, but every tensor has the shape and storage type a real llama-family model of
that size would have, so load time, memory use and decode speed behave like the real thing (a
weight's value does not change how fast a matmul runs). The file carries a byte-fallback SentencePiece
tokenizer and a ChatML chat template so servers can answer chat completions with it.

Speed: quantized blocks are written straight from a pool of pre-generated valid blocks (a finite
fp16 scale plus random quants), cycled from a random offset per tensor, so writing costs little
more than the disk write itself (a 1 GB Q8_0 file takes a few seconds, not minutes of quantizing).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType

ARCH = "llama"

QUANT_TYPES: dict[str, GGMLQuantizationType] = {
    "Q8_0": GGMLQuantizationType.Q8_0,
    "Q4_0": GGMLQuantizationType.Q4_0,
    "F16": GGMLQuantizationType.F16,
    "F32": GGMLQuantizationType.F32,
}

FILE_TYPES: dict[str, LlamaFileType] = {
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
    "F16": LlamaFileType.MOSTLY_F16,
    "F32": LlamaFileType.ALL_F32,
}

# ChatML: tiny, widely understood by llama.cpp (detected by "<|im_start|>") and by jinja renderers.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Tokens every generated vocabulary starts with; byte tokens make any text encodable.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
N_BYTE_TOKENS = 256
MIN_VOCAB = len(SPECIAL_TOKENS) + N_BYTE_TOKENS + len(CHAT_TOKENS)

WEIGHT_STD = 0.02  # typical init scale; keeps activations finite through random layers
DATA_ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT


@dataclass(frozen=True)
class ModelShape:
    """Hyper-parameters that decide every tensor's shape (and so the file's and KV cache's size)."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int = 4096
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    head_dim: int | None = None  # None: n_embd // n_head (llama's default)
    tied_embeddings: bool = False  # True: no output.weight, the output reuses token_embd (llama 3.2)
    name: str = "custom"

    def __post_init__(self) -> None:
        for field in ("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_vocab", "n_ctx_train"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_head_kv ({self.n_head_kv})")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head}) or set head_dim")
        if self.n_vocab < MIN_VOCAB:
            raise ValueError(f"n_vocab must be >= {MIN_VOCAB} (special, chat and 256 byte tokens)")

    @property
    def head_dim_resolved(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def n_params(self) -> int:
        return sum(math.prod(t.ne) for t in tensor_plan(self, "F32"))


PRESETS: dict[str, ModelShape] = {
    # Two layers, 256 wide: loads and generates in llama.cpp in well under a second (unit tests).
    "tiny": ModelShape(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=512,
                       n_ctx_train=2048, name="tiny"),
    # ~110 M parameters: big enough that load and decode timings mean something, small enough for CI.
    "test-100m": ModelShape(n_layer=10, n_embd=768, n_head=12, n_head_kv=4, n_ff=2048, n_vocab=32000,
                            n_ctx_train=8192, name="test-100m"),
    "llama-3.2-1b": ModelShape(n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192, n_vocab=128256,
                               n_ctx_train=131072, rope_theta=500000.0, head_dim=64, tied_embeddings=True,
                               name="llama-3.2-1b"),
    "llama-3.2-3b": ModelShape(n_layer=28, n_embd=3072, n_head=24, n_head_kv=8, n_ff=8192, n_vocab=128256,
                               n_ctx_train=131072, rope_theta=500000.0, head_dim=128, tied_embeddings=True,
                               name="llama-3.2-3b"),
    "llama-3-8b": ModelShape(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256,
                             n_ctx_train=8192, rope_theta=500000.0, name="llama-3-8b"),
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as stored: GGUF name, ggml dims (ne[0] = row length first) and storage type."""

    name: str
    ne: tuple[int, ...]
    ggml_type: GGMLQuantizationType

    @property
    def n_bytes(self) -> int:
        return tensor_nbytes(self.ne, self.ggml_type)


def tensor_nbytes(ne: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int:
    """Bytes of a tensor in ggml's block layout: rows × (row length / block size) × block bytes."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    if ne[0] % block_size:
        raise ValueError(f"row length {ne[0]} is not a multiple of {ggml_type.name} block size {block_size}")
    return math.prod(ne[1:]) * (ne[0] // block_size) * type_size


def _matrix_type(row_length: int, quant: str) -> GGMLQuantizationType:
    """The requested type, or F16 for rows a quant block does not divide (as llama-quantize does)."""
    wanted = QUANT_TYPES[quant]
    block_size = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if row_length % block_size == 0 else GGMLQuantizationType.F16


def tensor_plan(shape: ModelShape, quant: str = "Q8_0") -> list[TensorSpec]:
    """Every tensor of a llama model of this shape, in file order, with its storage type."""
    if quant not in QUANT_TYPES:
        raise ValueError(f"unknown quant {quant!r}; choose one of {', '.join(QUANT_TYPES)}")
    f32 = GGMLQuantizationType.F32
    q_width = shape.n_head * shape.head_dim_resolved
    kv_width = shape.n_head_kv * shape.head_dim_resolved

    def matrix(name: str, row_length: int, n_rows: int) -> TensorSpec:
        return TensorSpec(name, (row_length, n_rows), _matrix_type(row_length, quant))

    plan = [matrix("token_embd.weight", shape.n_embd, shape.n_vocab)]
    for i in range(shape.n_layer):
        plan += [
            TensorSpec(f"blk.{i}.attn_norm.weight", (shape.n_embd,), f32),
            matrix(f"blk.{i}.attn_q.weight", shape.n_embd, q_width),
            matrix(f"blk.{i}.attn_k.weight", shape.n_embd, kv_width),
            matrix(f"blk.{i}.attn_v.weight", shape.n_embd, kv_width),
            matrix(f"blk.{i}.attn_output.weight", q_width, shape.n_embd),
            TensorSpec(f"blk.{i}.ffn_norm.weight", (shape.n_embd,), f32),
            matrix(f"blk.{i}.ffn_gate.weight", shape.n_embd, shape.n_ff),
            matrix(f"blk.{i}.ffn_up.weight", shape.n_embd, shape.n_ff),
            matrix(f"blk.{i}.ffn_down.weight", shape.n_ff, shape.n_embd),
        ]
    plan.append(TensorSpec("output_norm.weight", (shape.n_embd,), f32))
    if not shape.tied_embeddings:
        plan.append(matrix("output.weight", shape.n_embd, shape.n_vocab))
    return plan


@dataclass(frozen=True)
class WrittenModel:
    """What write_model produced: enough to report size and writing speed."""

    path: Path
    shape: ModelShape
    quant: str
    file_bytes: int
    tensor_bytes: int
    n_tensors: int
    n_params: int
    seconds: float


def _vocabulary(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Byte-fallback SentencePiece vocabulary padded with filler pieces up to n_vocab."""
    tokens = list(SPECIAL_TOKENS)
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(N_BYTE_TOKENS)]
    types += [TokenType.BYTE] * N_BYTE_TOKENS
    tokens += CHAT_TOKENS
    types += [TokenType.CONTROL] * len(CHAT_TOKENS)
    # Fillers: printable characters first (with and without the SentencePiece space marker) so random
    # generations detokenize to readable text, then numbered pieces to reach the real vocab size.
    fillers = [c for c in (chr(i) for i in range(33, 127))]
    fillers += ["\u2581" + c for c in fillers] + ["\u2581"]
    need = n_vocab - len(tokens)
    fillers = fillers[:need]
    fillers += [f"\u2581w{i}" for i in range(need - len(fillers))]
    tokens += fillers
    types += [TokenType.NORMAL] * len(fillers)
    scores = [0.0] * (n_vocab - len(fillers)) + [-float(i) for i in range(len(fillers))]
    return tokens, scores, [int(t) for t in types]


def _block_pool(ggml_type: GGMLQuantizationType, rng: np.random.Generator, pool_bytes: int) -> np.ndarray:
    """Valid random data for a storage type, as bytes: finite fp16 scales and random quants."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    n_blocks = max(1, pool_bytes // type_size)
    if ggml_type == GGMLQuantizationType.Q8_0:
        # block: fp16 d, then 32 int8 q; weight = d*q. Uniform q in [-127,127] has std ~73.
        blocks = np.empty((n_blocks, type_size), dtype=np.uint8)
        scales = (WEIGHT_STD / 73.0 * rng.uniform(0.5, 1.5, n_blocks)).astype("<f2")
        blocks[:, :2] = scales.view(np.uint8).reshape(n_blocks, 2)
        blocks[:, 2:] = rng.integers(-127, 128, (n_blocks, 32), dtype=np.int8).view(np.uint8)
        return blocks.reshape(-1)
    if ggml_type == GGMLQuantizationType.Q4_0:
        # block: fp16 d, then 16 bytes of nibble pairs; weight = d*(nibble-8), std of (nibble-8) ~4.6.
        blocks = np.empty((n_blocks, type_size), dtype=np.uint8)
        scales = (WEIGHT_STD / 4.6 * rng.uniform(0.5, 1.5, n_blocks)).astype("<f2")
        blocks[:, :2] = scales.view(np.uint8).reshape(n_blocks, 2)
        blocks[:, 2:] = rng.integers(0, 256, (n_blocks, 16), dtype=np.uint8)
        return blocks.reshape(-1)
    float_dtype = {GGMLQuantizationType.F16: "<f2", GGMLQuantizationType.F32: "<f4"}[ggml_type]
    n_values = n_blocks * block_size
    return (rng.standard_normal(n_values, dtype=np.float32) * WEIGHT_STD).astype(float_dtype).view(np.uint8)


def _write_cycled(fout, pool: np.ndarray, n_bytes: int, unit: int, rng: np.random.Generator) -> None:
    """Write n_bytes taken from the pool, starting at a random whole-block offset and wrapping."""
    pool_view = memoryview(pool)
    n_units = len(pool) // unit
    position = int(rng.integers(0, n_units)) * unit
    remaining = n_bytes
    while remaining:
        take = min(remaining, len(pool) - position)
        fout.write(pool_view[position:position + take])
        remaining -= take
        position = 0


def write_model(path: str | os.PathLike[str], shape: ModelShape, quant: str = "Q8_0", seed: int = 0,
                pool_bytes: int = 16 << 20) -> WrittenModel:
    """Write a random-weight llama GGUF of this shape; tensors stream to disk, memory stays ~pool size."""
    started = time.perf_counter()
    path = Path(path)
    plan = tensor_plan(shape, quant)
    rng = np.random.default_rng(seed)

    writer = GGUFWriter(path, ARCH)
    writer.add_name(shape.name)
    writer.add_file_type(int(FILE_TYPES[quant]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_rope_dimension_count(shape.head_dim_resolved)
    if shape.head_dim is not None:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_vocab_size(shape.n_vocab)

    tokens, scores, types = _vocabulary(shape.n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    for spec in plan:
        # A uint8 "byte shape" in numpy order (rows first, bytes per row last): the writer turns it back
        # into element counts for the raw type and reverses it into ggml's ne order.
        block_size, type_size = gguf.GGML_QUANT_SIZES[spec.ggml_type]
        byte_shape = (*reversed(spec.ne[1:]), spec.ne[0] // block_size * type_size)
        writer.add_tensor_info(spec.name, byte_shape, np.dtype(np.uint8), spec.n_bytes, raw_dtype=spec.ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()

    pools: dict[GGMLQuantizationType, np.ndarray] = {}
    fout = writer.fout[0]
    writer.write_padding(fout, fout.tell())
    for spec in plan:
        writer.write_padding(fout, fout.tell())
        if spec.name.endswith("norm.weight"):
            fout.write(np.ones(spec.ne, dtype="<f4").tobytes())
            continue
        if spec.ggml_type not in pools:
            largest = max(s.n_bytes for s in plan if s.ggml_type == spec.ggml_type)
            pools[spec.ggml_type] = _block_pool(spec.ggml_type, rng, min(pool_bytes, largest))
        _write_cycled(fout, pools[spec.ggml_type], spec.n_bytes, gguf.GGML_QUANT_SIZES[spec.ggml_type][1], rng)
    writer.write_padding(fout, fout.tell())
    writer.close()

    return WrittenModel(
        path=path, shape=shape, quant=quant, file_bytes=path.stat().st_size,
        tensor_bytes=sum(s.n_bytes for s in plan), n_tensors=len(plan), n_params=shape.n_params,
        seconds=time.perf_counter() - started,
    )


def shape_from_args(args: argparse.Namespace) -> ModelShape:
    """A preset (default tiny) with any explicitly given dimension overriding it."""
    base = PRESETS[args.preset or "tiny"]
    overrides = {
        "n_layer": args.layers, "n_embd": args.embd, "n_head": args.heads, "n_head_kv": args.kv_heads,
        "n_ff": args.ff, "n_vocab": args.vocab, "n_ctx_train": args.ctx, "head_dim": args.head_dim,
        "rope_theta": args.rope_theta,
    }
    changes = {k: v for k, v in overrides.items() if v is not None}
    if args.tied:
        changes["tied_embeddings"] = True
    if changes:
        if "n_head" in changes and "n_head_kv" not in changes and changes["n_head"] % base.n_head_kv:
            changes["n_head_kv"] = changes["n_head"]
        changes["name"] = args.name or (f"{base.name}-custom" if args.preset else "custom")
    elif args.name:
        changes["name"] = args.name
    return dataclasses.replace(base, **changes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="GGUF file to write")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="base shape (default: tiny)")
    parser.add_argument("--layers", type=int, help="n_layer (block_count)")
    parser.add_argument("--embd", type=int, help="n_embd (embedding_length)")
    parser.add_argument("--heads", type=int, help="attention heads")
    parser.add_argument("--kv-heads", type=int, help="key/value heads (GQA)")
    parser.add_argument("--ff", type=int, help="feed-forward width")
    parser.add_argument("--vocab", type=int, help=f"vocabulary size (>= {MIN_VOCAB})")
    parser.add_argument("--ctx", type=int, help="training context length written to metadata")
    parser.add_argument("--head-dim", type=int, help="per-head dimension if not embd/heads")
    parser.add_argument("--rope-theta", type=float, help="RoPE frequency base")
    parser.add_argument("--tied", action="store_true", help="tie output to token embeddings (no output.weight)")
    parser.add_argument("--name", help="general.name in metadata")
    parser.add_argument("--quant", choices=list(QUANT_TYPES), default="Q8_0", help="weight type (default Q8_0)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    try:
        shape = shape_from_args(args)
    except ValueError as exc:
        print(f"clawbot make-model: {exc}", file=sys.stderr)
        return 2
    written = write_model(args.out, shape, quant=args.quant, seed=args.seed)
    rate = written.file_bytes / max(written.seconds, 1e-9) / 1e6
    print(f"wrote {written.path} ({shape.name}, {args.quant}): {written.file_bytes / 2**20:.1f} MiB, "
          f"{written.n_params / 1e6:.1f} M params, {written.n_tensors} tensors in {written.seconds:.2f} s "
          f"({rate:.0f} MB/s)")
    return 0
