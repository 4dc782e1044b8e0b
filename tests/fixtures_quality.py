"""Broken models for the quality gate's tests (tests/test_quality.py), made from a real GGUF:

- `scrambled_copy`: the same file, header and tensor shapes, with the blocks of every tensor shuffled: each block
  stays a valid block of its type (so it loads, and the value distribution is the same), but no weight is where
  training (or modelgen's seed) put it. What "random weights of the same shape" means for a model of any type,
  also one whose quant blocks could not be drawn at random without NaN scales.
- `truncated_copy`: the first part of the file (a download cut short).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np


def scrambled_copy(source: Path, dest: Path, seed: int = 7) -> Path:
    """Copy `source` to `dest` with the blocks of every tensor (rows of its ggml blocks) permuted."""
    shutil.copyfile(source, dest)
    reader = gguf.GGUFReader(str(source))
    data = np.memmap(dest, dtype=np.uint8, mode="r+")
    rng = np.random.default_rng(seed)
    for tensor in reader.tensors:
        _, block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
        start, n = int(tensor.data_offset), int(tensor.n_bytes)
        if n < 2 * block_bytes:
            continue
        blocks = np.array(data[start:start + n]).reshape(-1, block_bytes)
        data[start:start + n] = blocks[rng.permutation(len(blocks))].reshape(-1)
    data.flush()
    del data
    return dest


def truncated_copy(source: Path, dest: Path, fraction: float = 0.5) -> Path:
    with open(source, "rb") as src, open(dest, "wb") as out:
        out.write(src.read(int(source.stat().st_size * fraction)))
    return dest


def swap_models(where: Path) -> dict[str, Path]:
    """Three versions of one model for the staged-swap tests: modelgen's tiny preset in F16 (seed 1), its Q8_0 made
    by the vendored llama-quantize (the ordinary re-quantization the gate accepts) and a block-shuffled copy of that
    Q8_0 (random weights of the same shape, which it rejects)."""
    import subprocess
    import sys

    from tests.fixtures_models import write_model_file

    f16 = write_model_file(where, "tiny", "F16")
    q8 = where / "tiny-Q8_0.gguf"
    done = subprocess.run([sys.executable, "-m", "clawbot", "quantize", str(f16), "--type", "Q8_0", str(q8)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return {"f16": f16, "q8": q8, "scrambled": scrambled_copy(q8, where / "tiny-Q8_0-scrambled.gguf")}
