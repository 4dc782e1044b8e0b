"""One run plan: the plan preflight computes at deploy time (a NodeFacts read over SSH) is the plan the
supervisor starts the model server with (the same facts read on the node), for CPU nodes, full and partial
GPU offload, the llama-cpp-python engine and every flash attention setting. The whole plans are compared,
reasons included, and each case also pins the values that make it that case."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from clawbot.common import preflight, sizing
from clawbot.common.config import defaults
from clawbot.common.sizing import GIB, MIB
from clawbot.model import staging, supervisor
from clawbot.model.runplan import GPU_UBATCH, RunPlan
from tests.fixtures_models import write_model_file

CORES = 4
CONTEXT = 1024
MAX_CONCURRENCY = 4
H100 = preflight.GpuFacts("NVIDIA H100 80GB HBM3", 81559 * MIB, 0)
BUILDS = {"cpu": "/engines/cpu/llama-server", "cuda": "/engines/cuda/llama-server"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_model_file(tmp_path_factory.mktemp("runplan-models"), "tiny", "Q8_0", n_layer=8)


def _two_and_a_half_slots(info: sizing.ModelInfo, n_ubatch: int) -> int:
    """Host memory where 2 slots of CONTEXT fit and a 3rd does not (flash attention counted on)."""
    two, three = (sizing.size_model(info, CONTEXT * n, n, n_ubatch=n_ubatch, flash_attn=True).total_bytes
                  for n in (2, 3))
    return (two + three) // 2


def _five_layer_gpu(info: sizing.ModelInfo, slots: int) -> preflight.GpuFacts:
    """A GPU with room for exactly 5 of the 8 layers at `slots` slots (partial offload)."""
    fit = sizing.size_model(info, CONTEXT * slots, slots, n_ubatch=GPU_UBATCH, flash_attn=True)
    per_layer = [w + fit.kv.bytes_per_layer for w in info.layer_bytes]
    free = 512 * MIB + fit.compute_bytes + sum(per_layer[:5]) + per_layer[5] // 2
    return preflight.GpuFacts("Small GPU", free, 0)


@dataclass(frozen=True)
class Case:
    server: dict  # model_server settings over the defaults
    gpus: str = "none"  # none | h100 | small (5 of 8 layers at 2 slots)
    host_free: str = "plenty"  # plenty | two-slots (2 of max_concurrency fit)
    expect: dict = field(default_factory=dict)  # plan field -> value this case must produce


CASES = {
    "cpu only, auto slots by host memory": Case(
        {}, host_free="two-slots",
        expect={"accelerator": "cpu", "gpu_layers": "0", "slots": 2, "ubatch": 512, "flash_attention": "auto",
                "threads": CORES - 1, "staging": True}),
    "full gpu offload": Case(
        {}, gpus="h100",
        expect={"accelerator": "cuda", "gpu_layers": "all", "slots": MAX_CONCURRENCY, "ubatch": GPU_UBATCH,
                "flash_attention": "on", "staging": False}),
    "partial offload, gpu too small": Case(
        {"parallel_slots": 2}, gpus="small",
        expect={"accelerator": "cuda", "gpu_layers": "5", "slots": 2, "staging": True}),
    "partial offload, auto slots by host memory": Case(
        {}, gpus="small", host_free="two-slots",
        expect={"accelerator": "cuda", "gpu_layers": "5", "slots": 2, "staging": True}),
    "llama-cpp-python": Case(
        {"engine": "llama-cpp-python"},
        expect={"accelerator": "cpu", "slots": 1, "flash_attention": "off", "load_mode": "mmap+mlock"}),
    "llama-cpp-python on a gpu": Case(
        {"engine": "llama-cpp-python"}, gpus="h100",
        expect={"accelerator": "cuda", "slots": 1, "gpu_layers": "all", "flash_attention": "on"}),
    **{f"flash attention {setting} on {where}": Case(
        {"flash_attention": setting, "parallel_slots": 0}, gpus=gpus, host_free="two-slots",
        expect={"flash_attention": value})
       for setting, where, gpus, value in [("auto", "cpu", "none", "auto"), ("on", "cpu", "none", "on"),
                                          ("off", "cpu", "none", "off"), ("auto", "cuda", "h100", "on"),
                                          ("on", "cuda", "h100", "on"), ("off", "cuda", "h100", "off")]},
}


def _config(model: Path, case: Case) -> dict:
    config = defaults()
    config["context_window"] = CONTEXT
    config["model_gateway"]["max_concurrency"] = MAX_CONCURRENCY
    config["model_server"].update(model_path=str(model), **case.server)
    return config


def _facts(case: Case, info: sizing.ModelInfo) -> tuple[int, tuple[preflight.GpuFacts, ...]]:
    gpus = {"none": (), "h100": (H100,), "small": (_five_layer_gpu(info, 2),)}[case.gpus]
    ubatch = GPU_UBATCH if gpus else sizing.DEFAULT_UBATCH
    host_free = 64 * GIB if case.host_free == "plenty" else _two_and_a_half_slots(info, ubatch)
    return host_free, gpus


def deploy_plan(config: dict, host_free: int, gpus) -> RunPlan:
    """Deploy's path: the NodeFacts clawbot.control.facts.NodeMemory builds from the node over SSH, judged by
    preflight.check_config."""
    node = preflight.NodeFacts(memory_total=2 * host_free, memory_available=host_free,
                               memory_source="MemAvailable + memory held by the running clawbot services",
                               cgroup_limit=None, hugepages_total=0, hugepages_free=0, disk_free=100 * GIB,
                               gpus=gpus, usable_cores=CORES)
    report = preflight.check_config(sizing.read_model_info(config["model_server"]["model_path"]), config, node)
    assert report.plan is not None
    return report.plan


def node_plan(config: dict, host_free: int, gpus, tmp_path: Path, monkeypatch,
              staged_copy: Path | None = None) -> tuple[RunPlan, list[str]]:
    """The supervisor's own path to its plan (its local fact readers fed the same facts), up to the command
    it would start. Staging finds no hugetlbfs and serves the disk file, as on a node without the mount,
    unless staged_copy stands for a copy that succeeded."""
    monkeypatch.setattr(preflight, "read_meminfo",
                        lambda path="/proc/meminfo": {"MemTotal": 2 * host_free, "MemAvailable": host_free})
    monkeypatch.setattr(preflight, "cgroup_memory", lambda *args: (None, None))
    monkeypatch.setattr(preflight, "query_gpus", lambda *args: gpus)
    monkeypatch.setattr(preflight, "usable_cores", lambda: CORES)
    monkeypatch.setattr(preflight, "memlock_limit", lambda: preflight.UNLIMITED)  # the unit's LimitMEMLOCK=infinity

    def no_hugetlbfs(mount):
        raise staging.StagingError(f"{mount} is not a hugetlbfs mount")

    if staged_copy is None:
        monkeypatch.setattr(staging, "ensure_mount", no_hugetlbfs)
    else:
        monkeypatch.setattr(staging, "ensure_mount", lambda mount: False)
        monkeypatch.setattr(staging, "stage", lambda source, *args: staging.StagedModel(
            str(source), 0, 0, "", str(staged_copy), 0, 0, 2048, 1))
    sup = supervisor.Supervisor(config, tmp_path / "state", find_engine=BUILDS.get)
    command = sup._prepare_start()
    assert sup.plan is not None
    return sup.plan, command


@pytest.mark.parametrize("name", list(CASES))
def test_preflight_plans_what_the_supervisor_starts(name, model, tmp_path, monkeypatch):
    case = CASES[name]
    config = _config(model, case)
    host_free, gpus = _facts(case, sizing.read_model_info(model))
    at_deploy = deploy_plan(config, host_free, gpus)
    at_start, command = node_plan(config, host_free, gpus, tmp_path, monkeypatch)
    assert at_deploy == at_start, f"deploy:\n{at_deploy.to_json()}\nnode:\n{at_start.to_json()}"
    assert {key: getattr(at_start, key).value for key in case.expect} == case.expect, at_start.to_json()
    if "-np" in command:  # llama-server: the command line is the plan's
        assert command[command.index("-np") + 1] == str(at_start.slots.value)
        assert command[command.index("-ngl") + 1] == at_start.gpu_layers.value
        assert command[command.index("-fa") + 1] == at_start.flash_attention.value


def test_the_supervisor_counts_staged_weights_out_of_free_memory(model, tmp_path, monkeypatch):
    """The one fact deploy cannot know: whether staging will succeed. Staged weights sit in huge pages that
    MemAvailable no longer counts, so the supervisor plans again with them outside the budget."""
    info = sizing.read_model_info(model)
    config = _config(model, Case({}))
    three = sizing.size_model(info, CONTEXT * 3, 3, flash_attn=True).total_bytes
    host_free = three - info.tensor_bytes  # 3 slots fit only with the weights outside
    staged = tmp_path / "staged.gguf"
    plan, command = node_plan(config, host_free, (), tmp_path, monkeypatch, staged_copy=staged)
    assert plan.slots.value == 3 and "staged in huge pages" in plan.slots.reason
    assert command[command.index("-m") + 1] == str(staged)
    assert deploy_plan(config, host_free, ()).slots.value < 3  # deploy judges the weights in host memory
