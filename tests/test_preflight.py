"""clawbot preflight: refuses what cannot fit (need vs have), JSON shape, bounded run time, node facts."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import pytest

from clawbot.common import preflight
from clawbot.common import sizing
from fixtures_models import gguf_100m, models_dir, tiny_gguf  # noqa: F401


def run_cli(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clawbot", "preflight", *args],
                          capture_output=True, text=True, timeout=timeout_s)


def test_refuses_a_model_that_cannot_fit_naming_need_and_have(tiny_gguf):
    done = run_cli("--model", str(tiny_gguf), "--context", "4096", "--parallel", "1", "--memory-limit", "1MiB",
                   "--no-probes")
    assert done.returncode == 1, done.stdout + done.stderr
    info = sizing.read_model_info(tiny_gguf)
    fit = sizing.size_model(info, 4096, 1, flash_attn=True)
    expected = (f"model needs {sizing.gib(fit.total_bytes)} (weights {sizing.gib(fit.weights_bytes)} + "
                f"KV {sizing.gib(fit.kv_bytes)} + compute {sizing.gib(fit.compute_bytes + fit.output_bytes)}) "
                "but only 1.0 MiB is available")
    assert expected in done.stderr
    assert "does NOT fit" in done.stdout


def test_accepts_a_model_that_fits_and_recommends_settings(tiny_gguf):
    done = run_cli("--model", str(tiny_gguf), "--context", "1024", "--parallel", "2", "--no-probes")
    assert done.returncode == 0, done.stderr
    assert "RESULT: fits" in done.stdout
    assert "hugepages = " in done.stdout


def test_json_output_shape(gguf_100m):
    done = run_cli("--model", str(gguf_100m), "--context", "2048", "--parallel", "2", "--cache-type", "q8_0", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) >= {"fits", "model", "settings", "need", "node", "probes", "findings", "recommendations",
                           "elapsed_s"}
    assert report["fits"] is True
    assert report["settings"]["n_ctx"] == 4096
    assert report["settings"]["cache_type_k"] == report["settings"]["cache_type_v"] == "q8_0"
    need = report["need"]
    assert need["total_bytes"] == need["weights_bytes"] + need["kv_bytes"] + need["compute_bytes"] + need["output_bytes"]
    info = sizing.read_model_info(gguf_100m)
    assert need["weights_bytes"] == info.tensor_bytes
    assert need["kv_bytes"] == sizing.kv_cache_size(info, 4096, 2, "q8_0", "q8_0").total_bytes
    assert need["kv_cells"] == 4096 and need["kv_cells_per_slot"] == 2048
    assert report["node"]["memory_available"] > 0 and report["node"]["memory_total"] >= report["node"]["memory_available"]
    assert report["probes"]["bandwidth_gbps"] > 0
    assert report["probes"]["storage_bytes_read"] > 32 * sizing.MIB
    assert report["recommendations"]["hugepages"] == sizing.hugepages_for(info.file_bytes)
    assert report["recommendations"]["context_window_max"] >= 2048
    for finding in report["findings"]:
        assert set(finding) == {"level", "code", "message"} and finding["level"] in ("error", "warning", "info")


def test_whole_run_with_probes_is_bounded(gguf_100m):
    started = time.perf_counter()
    done = run_cli("--model", str(gguf_100m), "--json")
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["elapsed_s"] < 5.0
    assert wall < 8.0  # interpreter start and imports included


def test_probes_respect_their_budgets(gguf_100m):
    gbps, seconds = preflight.probe_memory_bandwidth(budget_s=1.0)
    assert gbps > 0.5 and seconds < 1.6
    mbps, read, seconds = preflight.probe_storage_read(str(gguf_100m), budget_s=1.5)
    assert mbps > 1 and read > 0 and seconds < 2.2


def test_config_file_settings_and_flag_overrides(tmp_path, tiny_gguf):
    config = tmp_path / "clawbot.json"
    config.write_text(json.dumps({
        "context_window": 2048,
        "model_server": {"model_path": str(tiny_gguf), "parallel_slots": 3, "cache_type_k": "q8_0",
                         "cache_type_v": "q4_0"},
    }))
    done = run_cli("--config", str(config), "--no-probes", "--json")
    assert done.returncode == 0, done.stderr
    settings = json.loads(done.stdout)["settings"]
    assert (settings["context_window"], settings["parallel_slots"], settings["cache_type_k"],
            settings["cache_type_v"], settings["n_ctx"]) == (2048, 3, "q8_0", "q4_0", 6144)
    done = run_cli("--config", str(config), "--context", "512", "--cache-type-k", "f16", "--no-probes", "--json")
    settings = json.loads(done.stdout)["settings"]
    assert (settings["context_window"], settings["cache_type_k"], settings["cache_type_v"]) == (512, "f16", "q4_0")


def test_missing_model_is_a_usage_error(tmp_path):
    done = run_cli("--model", str(tmp_path / "absent.gguf"), "--no-probes")
    assert done.returncode == 2
    assert "model file not found" in done.stderr


def _node(available: int, **overrides) -> preflight.NodeFacts:
    values = dict(memory_total=available * 2, memory_available=available, memory_source="declared")
    values.update(overrides)
    return preflight.NodeFacts(**values)


def test_evaluate_is_pure_and_applies_the_articles_rules(tiny_gguf):
    info = sizing.read_model_info(tiny_gguf)
    settings = preflight.RunSettings(model_path=str(tiny_gguf), context_window=1024, parallel_slots=1)
    slow = preflight.ProbeResults(bandwidth_gbps=12.0, storage_mbps=150.0, storage_bytes_read=256 * sizing.MIB)
    report = preflight.evaluate(info, settings, _node(8 * sizing.GIB), slow)
    codes = {f.code: f.level for f in report.findings}
    assert report.fits and codes["memory_fit"] == "info"
    assert codes["memory_bandwidth"] == "warning" and codes["storage_speed"] == "warning"
    assert "memory_rule" not in codes

    # between the exact need and the 1.2 × parameters rule (a heavily quantized model: params declared
    # 4 × the weight bytes): fits, with the rule as a warning
    need = sizing.size_model(info, 1024, 1, flash_attn=True).total_bytes
    info = dataclasses.replace(info, n_params=4 * need)
    rule = int(info.n_params * 1.2)
    report = preflight.evaluate(info, settings, _node((need + rule) // 2))
    codes = {f.code: f.level for f in report.findings}
    assert report.fits and codes["memory_rule"] == "warning"

    report = preflight.evaluate(info, settings, _node(need - 1))
    assert not report.fits
    assert "but only" in next(f.message for f in report.findings if f.code == "memory_fit")


def test_evaluate_recommends_gpu_layers_when_a_gpu_is_present(tiny_gguf):
    info = sizing.read_model_info(tiny_gguf)
    settings = preflight.RunSettings(model_path=str(tiny_gguf), context_window=1024, parallel_slots=1)
    gpu = preflight.GpuFacts("Test GPU", memory_total=8 * sizing.GIB, memory_used=sizing.GIB)
    report = preflight.evaluate(info, settings, _node(8 * sizing.GIB, gpus=(gpu,)))
    assert report.recommendations["gpu_layers"] == info.n_layer + 1  # everything, output head included
    small = preflight.GpuFacts("Small GPU", memory_total=600 * sizing.MIB, memory_used=88 * sizing.MIB)
    report = preflight.evaluate(info, settings, _node(8 * sizing.GIB, gpus=(small,)))
    assert report.recommendations["gpu_layers"] == 0  # 512 MiB free is all reserve


def test_cgroup_limits_v2_and_v1(tmp_path):
    v2 = tmp_path / "v2"
    (v2 / "svc").mkdir(parents=True)
    (v2 / "svc" / "memory.max").write_text("1073741824\n")
    (v2 / "svc" / "memory.current").write_text("209715200\n")
    (v2 / "svc" / "memory.stat").write_text("anon 100\ninactive_file 104857600\n")
    proc = tmp_path / "cgroup-v2"
    proc.write_text("0::/svc\n")
    assert preflight.cgroup_memory(v2, proc) == (1 << 30, 100 * sizing.MIB)

    (v2 / "svc" / "memory.max").write_text("max\n")
    assert preflight.cgroup_memory(v2, proc) == (None, None)

    v1 = tmp_path / "v1"
    (v1 / "memory" / "grp").mkdir(parents=True)
    (v1 / "memory" / "grp" / "memory.limit_in_bytes").write_text("536870912\n")
    (v1 / "memory" / "grp" / "memory.usage_in_bytes").write_text("0\n")
    proc_v1 = tmp_path / "cgroup-v1"
    proc_v1.write_text("4:memory:/grp\n0::/\n")
    assert preflight.cgroup_memory(v1, proc_v1) == (512 * sizing.MIB, 0)


def test_meminfo_and_byte_sizes(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384 kB\nMemAvailable:    8192 kB\nHugePages_Total:      8\n"
                       "Hugepagesize:       2048 kB\n")
    values = preflight.read_meminfo(str(meminfo))
    assert values == {"MemTotal": 16 * sizing.MIB, "MemAvailable": 8 * sizing.MIB, "HugePages_Total": 8,
                      "Hugepagesize": 2 * sizing.MIB}
    assert preflight.parse_bytes("8G") == 8 * sizing.GIB
    assert preflight.parse_bytes("512MiB") == 512 * sizing.MIB
    assert preflight.parse_bytes("1.5GiB") == 3 * sizing.GIB // 2
    assert preflight.parse_bytes("123") == 123
    with pytest.raises(Exception):
        preflight.parse_bytes("lots")
