"""Shared pytest fixtures: small random-weight GGUFs written by clawbot.tools.modelgen, once per session.

Use from a test module in tests/:   from fixtures_models import tiny_gguf  # noqa: F401
(pytest puts tests/ on sys.path for modules there; from a subfolder add `pytest_plugins = ["fixtures_models"]`
in a conftest with tests/ on the path). Also home of `llama_load_log`, which loads a model in a separate
python with real llama-cpp-python and returns llama.cpp's own load log for comparisons.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clawbot.tools import modelgen


def write_model_file(directory: Path, preset: str = "tiny", quant: str = "Q8_0", **overrides) -> Path:
    """Write a preset (with dataclass overrides) to directory and return its path."""
    import dataclasses

    shape = dataclasses.replace(modelgen.PRESETS[preset], **overrides) if overrides else modelgen.PRESETS[preset]
    suffix = "-".join(f"{k}{v}" for k, v in sorted(overrides.items()))
    path = directory / f"{preset}{'-' + suffix if suffix else ''}-{quant}.gguf"
    modelgen.write_model(path, shape, quant=quant, seed=1)
    return path


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_gguf(models_dir) -> Path:
    """A 2-layer Q8_0 llama GGUF (~1.5 MB) with a ChatML template: loads and generates in llama.cpp."""
    return write_model_file(models_dir, "tiny", "Q8_0")


@pytest.fixture(scope="session")
def tiny_gguf_q4(models_dir) -> Path:
    return write_model_file(models_dir, "tiny", "Q4_0")


@pytest.fixture(scope="session")
def gguf_100m(models_dir) -> Path:
    """~110 M parameters, Q8_0 (~120 MB): big enough for timing-sensitive probes."""
    return write_model_file(models_dir, "test-100m", "Q8_0")


# --- llama.cpp's own view ------------------------------------------------------------------------------

_LOAD_SCRIPT = r"""
import json, sys
import llama_cpp
from llama_cpp import _logger
_logger.set_verbose(True)  # llama.cpp's log lines go to stderr
path, options = sys.argv[1], json.loads(sys.argv[2])
n_seq_max = options.pop("n_seq_max", 1)
kv_unified = options.pop("kv_unified", False)
# The same call llama-server makes for -np N: llama_init_from_model with n_seq_max = N.
model_params = llama_cpp.llama_model_default_params()
model = llama_cpp.llama_model_load_from_file(path.encode(), model_params)
assert model, "model failed to load"
params = llama_cpp.llama_context_default_params()
params.n_seq_max = n_seq_max
params.kv_unified = kv_unified
params.n_threads = params.n_threads_batch = 1
for key, value in options.items():
    setattr(params, key, value)
ctx = llama_cpp.llama_init_from_model(model, params)
assert ctx, "context failed to initialise"
llama_cpp.llama_free(ctx)
llama_cpp.llama_model_free(model)
"""


def llama_load_log(model: Path, timeout_s: float = 120, **options) -> str:
    """Create a llama.cpp context for `model` in a child python and return its stderr (the load log).

    options: n_ctx, n_seq_max, kv_unified, type_k/type_v (ggml ids), flash_attn_type (-1 auto, 0 off,
    1 on), n_ubatch, n_batch. A child process because llama.cpp logs from C straight to fd 2.
    """
    done = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(model), json.dumps(options)],
                          capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise AssertionError(f"llama.cpp load failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stderr


KV_LINE = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+)/(\d+) seqs\)")
COMPUTE_LINE = re.compile(r"(\S+) compute buffer size =\s*([\d.]+) MiB")
MODEL_BUFFER_LINE = re.compile(r"(\S+) model buffer size =\s*([\d.]+) MiB")


def parse_kv(log: str) -> dict:
    """{'mib', 'cells', 'layers', 'seqs', 'streams'} from llama.cpp's 'llama_kv_cache: size = ...' line."""
    match = KV_LINE.search(log)
    assert match, f"no KV cache line in the llama.cpp log:\n{log[-3000:]}"
    mib, cells, layers, seqs, streams = match.groups()
    return {"mib": float(mib), "cells": int(cells), "layers": int(layers), "seqs": int(seqs), "streams": int(streams)}


def parse_compute_mib(log: str) -> float:
    return sum(float(m.group(2)) for m in COMPUTE_LINE.finditer(log))


def parse_model_buffer_mib(log: str) -> float:
    return sum(float(m.group(2)) for m in MODEL_BUFFER_LINE.finditer(log))
