"""GPU model nodes without a GPU: `accelerator: auto` resolution from (fake) nvidia-smi output, the engine
the supervisor picks for it, and the GPU-aware run plan and llama-server flags (-ngl from sizing, -fa, -cram)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from clawbot.model.engines import Paths, llama_server
from clawbot.model.engines import build as engine
from clawbot.common import preflight
from clawbot.common import sizing
from clawbot.model import supervisor
from clawbot.model.runplan import GPU_UBATCH, HostFacts, RunPlan
from clawbot.common.config import defaults
from clawbot.common.sizing import MIB
from tests.fixtures_models import write_model_file

# What `nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader,nounits` printed on the
# benchmark H100 (benchmarks/results/gpu.json), plus a second, busier card.
H100_CSV = "NVIDIA H100 80GB HBM3, 81559, 0\n"
TWO_GPUS_CSV = "NVIDIA H100 80GB HBM3, 81559, 0\nNVIDIA GeForce RTX 4090, 24564, 20000\n"


def _config(**server) -> dict:
    config = defaults()
    config["model_server"].update(server)
    return config


def _flags(cmd: list[str]) -> dict[str, str]:
    return {name: cmd[cmd.index(name) + 1] for name in ("-ngl", "-fa", "-cram", "-c", "-np")}


def _plan(config: dict, model_path: str, accelerator: str = "cuda", gpu_free: int | None = None,
          host_free: int | None = None, **facts) -> RunPlan:
    """The run plan on a node whose one GPU has gpu_free bytes free (None: nvidia-smi lists no GPU)."""
    config = {**config, "model_server": {**config["model_server"], "accelerator": accelerator}}
    gpus = (preflight.GpuFacts("Test GPU", gpu_free, 0),) if gpu_free is not None else ()
    try:
        info = sizing.read_model_info(model_path)
    except (OSError, ValueError):
        info = None
    return RunPlan.resolve(config, HostFacts(gpus=gpus, host_free_bytes=host_free, usable_cores=2,
                                             memlock_limit=preflight.UNLIMITED, **facts), info)


def _command(config: dict, model_path: str, **plan_args) -> list[str]:
    plan = _plan(config, model_path, **plan_args)
    return llama_server.command(plan, config, Paths(model=model_path, binary="/e/llama-server"))


# --------------------------------------------------------------------------- nvidia-smi parsing, auto


def test_parse_gpus_reads_name_and_free_memory():
    (gpu,) = preflight.parse_gpus(H100_CSV)
    assert gpu.name == "NVIDIA H100 80GB HBM3"
    assert gpu.memory_total == 81559 * MIB and gpu.memory_free == 81559 * MIB
    gpus = preflight.parse_gpus(TWO_GPUS_CSV + "garbage line\nNVIDIA X, [N/A], 3\n")
    assert [g.name for g in gpus] == ["NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 4090"]
    assert gpus[1].memory_free == (24564 - 20000) * MIB
    assert preflight.parse_gpus("") == ()


def test_auto_is_cuda_with_a_gpu_and_cpu_without():
    def accelerator(configured: str, gpus, builds=None) -> str:
        facts = HostFacts(gpus=gpus, host_free_bytes=None, usable_cores=2, memlock_limit=0, engine_builds=builds)
        return RunPlan.resolve(_config(accelerator=configured), facts, None).accelerator.value

    gpus = preflight.parse_gpus(H100_CSV)
    assert accelerator("auto", gpus) == "cuda"
    assert accelerator("auto", ()) == "cpu"
    # an explicit choice is never second-guessed
    assert accelerator("cpu", gpus) == "cpu"
    assert accelerator("vulkan", ()) == "vulkan"
    # but a build the node lacks falls back to the CPU build
    assert accelerator("auto", gpus, builds=frozenset({"cpu"})) == "cpu"
    assert accelerator("auto", gpus, builds=frozenset({"cpu", "cuda"})) == "cuda"


def test_compute_capability_picks_the_cuda_architecture():
    assert engine.parse_compute_capabilities("9.0\n") == "90"
    flags = engine.cmake_flags("cuda", engine.parse_compute_capabilities("9.0\n"))
    assert "-DGGML_CUDA=ON" in flags and "-DCMAKE_CUDA_ARCHITECTURES=90" in flags


# --------------------------------------------------------------------------- -fa and -ngl


def test_flash_attention_auto_is_on_for_cuda_only():
    def flash(setting: str, accelerator: str, engine_name: str = "llama-server") -> str:
        return _plan(_config(flash_attention=setting, engine=engine_name), "/m.gguf", accelerator).flash_attention.value

    assert flash("auto", "cuda") == "on"
    assert flash("auto", "cpu") == "auto"
    assert flash("auto", "vulkan") == "auto"
    assert flash("off", "cuda") == "off"  # an explicit setting wins
    # llama_cpp.server takes only on/off: `auto` off CUDA is its default, off (and sizing counts it off)
    assert flash("auto", "cpu", "llama-cpp-python") == "off"
    assert flash("auto", "cuda", "llama-cpp-python") == "on"


def test_gpu_layers_explicit_and_cpu():
    assert _plan(_config(gpu_layers=20), "/m.gguf", "cuda", gpu_free=1).gpu_layers.value == "20"
    assert _plan(_config(gpu_layers=-1), "/m.gguf", "cpu", gpu_free=80 << 30).gpu_layers.value == "0"
    # free memory unknown, or a model that cannot be read: all layers (preflight checked the fit)
    assert _plan(_config(gpu_layers=-1), "/m.gguf", "cuda").gpu_layers.value == "all"
    assert _plan(_config(gpu_layers=-1), "/does/not/exist.gguf", "cuda", gpu_free=1 << 30).gpu_layers.value == "all"


@pytest.fixture(scope="module")
def eight_layer_model(tmp_path_factory) -> Path:
    return write_model_file(tmp_path_factory.mktemp("gpu-models"), "tiny", "Q8_0", n_layer=8)


def test_gpu_layers_all_when_the_model_fits_else_the_most_that_fit(eight_layer_model):
    config = _config(gpu_layers=-1, parallel_slots=2, flash_attention="auto")
    config["context_window"] = 1024
    path = str(eight_layer_model)

    def gpu_layers(free: int) -> str:
        return _plan(config, path, "cuda", gpu_free=free).gpu_layers.value

    assert gpu_layers(80 << 30) == "all"

    info = sizing.read_model_info(path)
    fit = sizing.size_model(info, 1024 * 2, 2, n_ubatch=GPU_UBATCH, flash_attn=True)
    reserve = 512 * MIB  # gpu_layers_that_fit's default driver/compute reserve
    per_layer = [w + fit.kv.bytes_per_layer for w in info.layer_bytes]
    # room for exactly 5 layers: 5 layers are offloaded, the other 3 (and the output head) stay on the CPU
    free = reserve + fit.compute_bytes + sum(per_layer[:5]) + per_layer[5] // 2
    assert gpu_layers(free) == "5"
    assert sizing.gpu_layers_that_fit(fit, free).n_gpu_layers == 5
    # not even one layer: nothing offloaded
    assert gpu_layers(reserve) == "0"
    # every layer fits but not the output head: all repeating layers, not `all`
    free = reserve + fit.compute_bytes + sum(per_layer) + info.output_bytes // 2
    assert gpu_layers(free) == str(info.n_layer)


def test_command_line_for_a_cuda_node_and_for_cpu(eight_layer_model):
    config = _config(gpu_layers=-1, flash_attention="auto", accelerator="auto", parallel_slots=4)
    config["context_window"] = 4096
    gpu = _command(config, str(eight_layer_model), accelerator="auto", gpu_free=80 << 30)
    assert _flags(gpu) == {"-ngl": "all", "-fa": "on", "-cram": "0", "-c": str(4096 * 4), "-np": "4"}
    # `auto` where nvidia-smi lists no GPU: the CPU
    cpu = _command(config, str(eight_layer_model), accelerator="auto")
    assert _flags(cpu)["-ngl"] == "0" and _flags(cpu)["-fa"] == "auto"


# --------------------------------------------------------------------------- the supervisor's choice


def _fake_nvidia_smi(directory: Path, csv: str | None) -> str:
    """A PATH holding only a fake nvidia-smi that prints csv (or fails when csv is None)."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvidia-smi"
    body = f"cat <<'EOF'\n{csv}EOF\n" if csv is not None else "echo 'NVIDIA-SMI has failed' >&2; exit 9\n"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(directory)


class FakeEngines:
    def __init__(self, available: dict[str, str]):
        self.available = available
        self.asked: list[str] = []

    def __call__(self, accelerator: str):
        self.asked.append(accelerator)
        return self.available.get(accelerator)


def _build(tmp_path, monkeypatch, csv, engines: FakeEngines, model: Path, accelerator="auto") -> list[str]:
    """The command the supervisor would start (no process), with nvidia-smi printing csv."""
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path / "bin", csv) + os.pathsep + "/usr/bin:/bin")
    config = _config(model_path=str(model), accelerator=accelerator, gpu_layers=-1, flash_attention="auto",
                     hugepages="off")
    sup = supervisor.Supervisor(config, tmp_path / "state", find_engine=engines)
    (tmp_path / "state").mkdir(exist_ok=True)
    return sup._prepare_start()


def test_supervisor_runs_the_cuda_engine_when_nvidia_smi_sees_a_gpu(tmp_path, monkeypatch, eight_layer_model):
    engines = FakeEngines({"cuda": "/engines/cuda/llama-server", "cpu": "/engines/cpu/llama-server"})
    cmd = _build(tmp_path, monkeypatch, H100_CSV, engines, eight_layer_model)
    assert cmd[0] == "/engines/cuda/llama-server"
    assert _flags(cmd)["-ngl"] == "all" and _flags(cmd)["-fa"] == "on" and _flags(cmd)["-cram"] == "0"


def test_supervisor_sizes_offload_by_the_freest_gpu(tmp_path, monkeypatch, eight_layer_model):
    # free memory comes from nvidia-smi: 100 MiB free leaves nothing beside the 512 MiB reserve, while of
    # two cards the one with the most free memory (the H100) decides
    engines = FakeEngines({"cuda": "/engines/cuda/llama-server"})
    cmd = _build(tmp_path, monkeypatch, "NVIDIA T4, 15360, 15260\n", engines, eight_layer_model)
    assert _flags(cmd)["-ngl"] == "0"
    cmd = _build(tmp_path, monkeypatch, TWO_GPUS_CSV, engines, eight_layer_model)
    assert _flags(cmd)["-ngl"] == "all"


def test_supervisor_falls_back_to_the_cpu_engine(tmp_path, monkeypatch, eight_layer_model):
    engines = FakeEngines({"cpu": "/engines/cpu/llama-server"})
    cmd = _build(tmp_path, monkeypatch, H100_CSV, engines, eight_layer_model)
    assert "cuda" in engines.asked
    assert cmd[0] == "/engines/cpu/llama-server"
    assert _flags(cmd)["-ngl"] == "0" and _flags(cmd)["-fa"] == "auto"


@pytest.mark.parametrize("csv", [None, ""], ids=["nvidia-smi fails", "no GPUs listed"])
def test_auto_without_a_usable_gpu_is_cpu(tmp_path, monkeypatch, eight_layer_model, csv):
    engines = FakeEngines({"cuda": "/engines/cuda/llama-server", "cpu": "/engines/cpu/llama-server"})
    cmd = _build(tmp_path, monkeypatch, csv, engines, eight_layer_model)
    assert cmd[0] == "/engines/cpu/llama-server"
    assert _flags(cmd)["-ngl"] == "0"


def test_explicit_cpu_runs_the_cpu_build_beside_a_gpu(tmp_path, monkeypatch, eight_layer_model):
    engines = FakeEngines({"cuda": "/engines/cuda/llama-server", "cpu": "/engines/cpu/llama-server"})
    cmd = _build(tmp_path, monkeypatch, H100_CSV, engines, eight_layer_model, accelerator="cpu")
    assert cmd[0] == "/engines/cpu/llama-server" and _flags(cmd)["-ngl"] == "0"


def test_no_engine_at_all_names_the_fix(tmp_path, monkeypatch, eight_layer_model):
    with pytest.raises(supervisor.ModelFileError, match="clawbot build-engine"):
        _build(tmp_path, monkeypatch, H100_CSV, FakeEngines({}), eight_layer_model)


# --------------------------------------------------------------------------- build from carried sources


def test_build_engine_refuses_a_source_dir_without_cmakelists(tmp_path):
    with pytest.raises(RuntimeError, match="not a llama.cpp source tree"):
        engine.build_engine("cpu", source_dir=tmp_path)


def test_build_engine_cli_takes_a_source_dir():
    import argparse

    parser = argparse.ArgumentParser()
    engine.add_arguments(parser)
    args = parser.parse_args(["--accelerator", "cuda", "--cuda-arch", "90", "--source-dir", "/src/llama.cpp"])
    assert args.source_dir == Path("/src/llama.cpp") and args.accelerator == "cuda"


# --------------------------------------------------------------------------- auto slots and ubatch


def test_ubatch_auto_is_1024_on_a_gpu_and_512_on_a_cpu(eight_layer_model):
    config = _config(gpu_layers=-1, parallel_slots=2)
    path = str(eight_layer_model)
    gpu = _command(config, path, accelerator="cuda", gpu_free=80 << 30)
    assert gpu[gpu.index("-ub") + 1] == "1024" and gpu[gpu.index("-b") + 1] == "2048"
    cpu = _command(config, path, accelerator="cpu")
    assert cpu[cpu.index("-ub") + 1] == "512"
    # every layer on the CPU although the binary is CUDA: no GPU pass to save
    assert _plan(_config(gpu_layers=0), path, "cuda").ubatch.value == 512
    cmd = _command(_config(ubatch_size=4096), path, accelerator="cuda", gpu_free=80 << 30)
    assert cmd[cmd.index("-ub") + 1] == "4096" and cmd[cmd.index("-b") + 1] == "4096"


def _kv_per_slot(path: str, context: int) -> int:
    info = sizing.read_model_info(path)
    return sizing.size_model(info, context, 1).kv_bytes


def test_auto_slots_are_max_concurrency_when_they_fit_on_the_gpu(eight_layer_model):
    config = _config(gpu_layers=-1, parallel_slots=0)
    config["model_gateway"]["max_concurrency"] = 6
    plan = _plan(config, str(eight_layer_model), "cuda", gpu_free=80 << 30)
    assert plan.slots.value == 6 and "GPU" in plan.slots.reason
    cmd = _command(config, str(eight_layer_model), accelerator="cuda", gpu_free=80 << 30)
    assert _flags(cmd)["-np"] == "6" and _flags(cmd)["-c"] == str(6 * config["context_window"])


def test_auto_slots_shrink_to_the_gpu_memory_left_for_kv(eight_layer_model):
    path = str(eight_layer_model)
    config = _config(gpu_layers=-1, parallel_slots=0, flash_attention="auto")
    config["context_window"] = 2048
    config["model_gateway"]["max_concurrency"] = 8
    info = sizing.read_model_info(path)
    per_slot = _kv_per_slot(path, 2048)

    def fit(n):
        return sizing.size_model(info, 2048 * n, n, n_ubatch=GPU_UBATCH, flash_attn=True)

    # the least free GPU memory (in 256 KiB steps) where 3 slots fit with every layer offloaded
    free = 512 * MIB
    while sizing.gpu_layers_that_fit(fit(3), free).n_gpu_layers <= info.n_layer:
        free += 256 * 1024
    assert per_slot > 256 * 1024
    assert sizing.gpu_layers_that_fit(fit(4), free).n_gpu_layers <= info.n_layer  # a 4th would not fit
    plan = _plan(config, path, "cuda", gpu_free=free)
    assert plan.slots.value == 3, plan
    # the flags agree: 3 slots, every layer offloaded
    cmd = _command(config, path, accelerator="cuda", gpu_free=free)
    assert _flags(cmd)["-np"] == "3" and _flags(cmd)["-ngl"] == "all"


def test_auto_slots_on_a_cpu_follow_free_host_memory(eight_layer_model):
    path = str(eight_layer_model)
    config = _config(parallel_slots=0)
    config["context_window"] = 4096
    config["model_gateway"]["max_concurrency"] = 4
    info = sizing.read_model_info(path)
    # flash_attention auto counts as on (llama.cpp enables it where the backend has the op, as the CPU does)
    two = sizing.size_model(info, 4096 * 2, 2, flash_attn=True).total_bytes
    three = sizing.size_model(info, 4096 * 3, 3, flash_attn=True).total_bytes
    plan = _plan(config, path, "cpu", host_free=(two + three) // 2)
    assert plan.slots.value == 2 and "free memory" in plan.slots.reason
    assert _plan(config, path, "cpu", host_free=64 << 30).slots.value == 4
    # weights in staged huge pages are not in MemAvailable: they do not count against it
    staged = _plan(config, path, "cpu", host_free=three - info.tensor_bytes, weights_staged=True)
    assert staged.slots.value == 3
    # not even one: one slot, and the reason says so
    tiny = _plan(config, path, "cpu", host_free=1024)
    assert tiny.slots.value == 1 and "not even one" in tiny.slots.reason
    # unknown memory: max_concurrency
    assert _plan(config, path, "cpu").slots.value == 4


def test_explicit_slots_and_llama_cpp_python(eight_layer_model):
    path = str(eight_layer_model)
    assert _plan(_config(parallel_slots=7), path, "cuda", gpu_free=1024).slots.value == 7
    for slots in (0, 1, 3):  # llama_cpp.server serves one request at a time, whatever the config says
        assert _plan(_config(parallel_slots=slots, engine="llama-cpp-python"), path, "cpu").slots.value == 1


def test_preflight_judges_auto_slots_at_the_count_that_fits(eight_layer_model):
    path = str(eight_layer_model)
    config = _config(parallel_slots=0, model_path=path)
    config["context_window"] = 4096
    config["model_gateway"]["max_concurrency"] = 4
    info = sizing.read_model_info(path)
    two = sizing.size_model(info, 4096 * 2, 2, flash_attn=True).total_bytes
    node = preflight.NodeFacts(memory_total=two, memory_available=two, memory_source="test")
    report = preflight.check_config(info, config, node)
    assert report.fits and report.settings.parallel_slots == 2 and report.plan.slots.value == 2
    assert any(f.code == "parallel_slots" and "2 of max_concurrency 4" in f.message for f in report.findings)
