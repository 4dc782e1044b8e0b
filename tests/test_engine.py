"""clawbot.model.engines.build: flag logic for every accelerator (no GPU here), source handling, cache, and a real build."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from clawbot import cli
from clawbot.model.engines import build as engine

LLAMA_CPP_OPTIONS = {"LLAMA_BUILD_SERVER", "LLAMA_USE_PREBUILT_UI", "LLAMA_OPENSSL", "LLAMA_BUILD_APP", "GGML_NATIVE"}


def flag_dict(flags: list[str]) -> dict[str, str]:
    return dict(f[2:].split("=", 1) for f in flags)


# --------------------------------------------------------------------------- cmake_flags


def test_cpu_flags_build_only_the_server_natively() -> None:
    flags = flag_dict(engine.cmake_flags("cpu", declared_options=LLAMA_CPP_OPTIONS))
    assert flags["LLAMA_BUILD_SERVER"] == "ON"
    assert flags["LLAMA_BUILD_TESTS"] == "OFF" and flags["LLAMA_BUILD_EXAMPLES"] == "OFF"
    assert flags["LLAMA_CURL"] == "OFF"
    assert flags["LLAMA_USE_PREBUILT_UI"] == "OFF"  # no download during the build
    assert flags["GGML_NATIVE"] == "ON"
    assert flags["BUILD_SHARED_LIBS"] == "OFF"
    assert not {"GGML_CUDA", "GGML_VULKAN", "GGML_HIP", "CMAKE_CUDA_ARCHITECTURES"} & flags.keys()


def test_portable_build_turns_native_off_and_gets_its_own_prefix() -> None:
    native = engine.cmake_flags("cpu")
    portable = engine.cmake_flags("cpu", native=False)
    assert flag_dict(portable)["GGML_NATIVE"] == "OFF"
    assert engine.build_key("cpu", native) != engine.build_key("cpu", portable)


def test_version_dependent_options_only_when_the_sources_declare_them() -> None:
    flags = flag_dict(engine.cmake_flags("cpu", declared_options=set()))
    assert "LLAMA_USE_PREBUILT_UI" not in flags and "LLAMA_OPENSSL" not in flags and "LLAMA_BUILD_APP" not in flags


@pytest.mark.parametrize("arch_in, arch_out", [("9.0", "90"), ("90", "90"), ("8.6,8.9", "86;89"), ("86;90", "86;90")])
def test_cuda_flags(arch_in: str, arch_out: str) -> None:
    flags = flag_dict(engine.cmake_flags("cuda", arch_in, declared_options=LLAMA_CPP_OPTIONS))
    assert flags["GGML_CUDA"] == "ON"
    assert flags["CMAKE_CUDA_ARCHITECTURES"] == arch_out
    assert "GGML_VULKAN" not in flags and "GGML_HIP" not in flags


def test_cuda_needs_an_architecture() -> None:
    with pytest.raises(ValueError, match="CUDA architecture"):
        engine.cmake_flags("cuda")
    with pytest.raises(ValueError, match="invalid CUDA architecture"):
        engine.cmake_flags("cuda", "hopper")


def test_vulkan_and_rocm_flags() -> None:
    vulkan = flag_dict(engine.cmake_flags("vulkan"))
    rocm = flag_dict(engine.cmake_flags("rocm"))
    assert vulkan["GGML_VULKAN"] == "ON" and "GGML_CUDA" not in vulkan and "GGML_HIP" not in vulkan
    assert rocm["GGML_HIP"] == "ON" and "GGML_CUDA" not in rocm and "GGML_VULKAN" not in rocm


def test_unknown_accelerator_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown accelerator 'metal'"):
        engine.cmake_flags("metal")


def test_build_key_names_version_accelerator_and_changes_with_flags() -> None:
    a = engine.build_key("cuda", engine.cmake_flags("cuda", "90"))
    b = engine.build_key("cuda", engine.cmake_flags("cuda", "89"))
    assert a.startswith(f"{engine.LLAMA_CPP_PYTHON_VERSION}-cuda-")
    assert a != b and a == engine.build_key("cuda", engine.cmake_flags("cuda", "9.0"))


# --------------------------------------------------------------------------- CUDA detection


@pytest.mark.parametrize("output, expected", [
    ("9.0\n", "90"),
    ("8.6\n8.6\n", "86"),
    ("9.0\n8.9\n\n", "89;90"),
    ("12.0\n", "120"),
])
def test_parse_compute_capabilities(output: str, expected: str) -> None:
    assert engine.parse_compute_capabilities(output) == expected


@pytest.mark.parametrize("output", ["", "\n", "[N/A]\n", "No devices were found\n"])
def test_parse_compute_capabilities_rejects_nonsense(output: str) -> None:
    with pytest.raises(ValueError):
        engine.parse_compute_capabilities(output)


def fake_nvidia_smi(stdout: str = "", returncode: int = 0, raises: Exception | None = None):
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if raises:
            raise raises
        return subprocess.CompletedProcess(cmd, returncode, stdout=stdout, stderr="")

    run.calls = calls
    return run


def test_detect_cuda_arch_from_nvidia_smi() -> None:
    run = fake_nvidia_smi("9.0\n")
    assert engine.detect_cuda_arch(run) == "90"
    assert run.calls == [["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"]]


@pytest.mark.parametrize("run", [
    fake_nvidia_smi("", returncode=9),
    fake_nvidia_smi(raises=FileNotFoundError("nvidia-smi")),
    fake_nvidia_smi(raises=subprocess.TimeoutExpired("nvidia-smi", 30)),
    fake_nvidia_smi("No devices were found\n"),
])
def test_detect_cuda_arch_without_a_gpu_is_none(run) -> None:
    assert engine.detect_cuda_arch(run) is None


def test_cuda_build_without_gpu_or_arch_fails_with_advice(monkeypatch, capsys) -> None:
    monkeypatch.setattr(engine, "detect_cuda_arch", lambda: None)
    assert cli.main(["build-engine", "--accelerator", "cuda"]) == 1
    assert "--cuda-arch" in capsys.readouterr().err


def test_bad_cuda_arch_is_refused_before_any_download(monkeypatch, capsys) -> None:
    monkeypatch.setattr(engine, "fetch_sdist", lambda *a: pytest.fail("fetched the sdist for a bad --cuda-arch"))
    assert cli.main(["build-engine", "--accelerator", "cuda", "--cuda-arch", "hopper"]) == 1
    assert "invalid CUDA architecture 'hopper'" in capsys.readouterr().err


# --------------------------------------------------------------------------- sources and cache


def make_sdist(path: Path) -> Path:
    """A stand-in sdist with the real layout: top dir, python package, vendor/llama.cpp with a .git pointer."""
    files = {
        "llama_cpp_python-0.3.36/pyproject.toml": b"[project]\n",
        "llama_cpp_python-0.3.36/llama_cpp/__init__.py": b"",
        "llama_cpp_python-0.3.36/vendor/llama.cpp/.git": b"gitdir: ../../.git/modules/vendor/llama.cpp\n",
        "llama_cpp_python-0.3.36/vendor/llama.cpp/CMakeLists.txt":
            b"option(LLAMA_BUILD_SERVER \"server\" ON)\n  option( LLAMA_USE_PREBUILT_UI \"ui\" ON)\n",
        "llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/CMakeLists.txt": b"option(GGML_NATIVE \"native\" ON)\n",
        "llama_cpp_python-0.3.36/vendor/llama.cpp/tools/server/README.md": b"# server\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_takes_only_vendored_llama_cpp(tmp_path: Path) -> None:
    dest = engine.extract_vendored_llama_cpp(make_sdist(tmp_path / "s.tar.gz"), tmp_path / "src")
    found = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert found == ["CMakeLists.txt", "ggml/CMakeLists.txt", "tools/server/README.md"]
    assert engine.declared_cmake_options(dest) == {"LLAMA_BUILD_SERVER", "LLAMA_USE_PREBUILT_UI", "GGML_NATIVE"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".extract")] == []


def test_extract_refuses_a_tarball_without_llama_cpp(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        info = tarfile.TarInfo("something-1.0/setup.py")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(RuntimeError, match="no vendor/llama.cpp"):
        engine.extract_vendored_llama_cpp(bad, tmp_path / "src")


@pytest.mark.parametrize("has_data_filter", [True, False])
def test_extract_refuses_paths_that_escape(tmp_path: Path, monkeypatch, has_data_filter: bool) -> None:
    if not has_data_filter:  # the code path Debian 12's Python 3.11.2 takes
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        for name, data in [("llama_cpp_python-0.3.36/vendor/llama.cpp/CMakeLists.txt", b""),
                           ("llama_cpp_python-0.3.36/vendor/llama.cpp/../../../../escaped.txt", b"x")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises((RuntimeError, tarfile.FilterError)):
        engine.extract_vendored_llama_cpp(evil, tmp_path / "out" / "src")
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (tmp_path / "out" / "src").exists()


@pytest.mark.parametrize("has_data_filter", [True, False])
def test_extract_works_without_the_data_filter_too(tmp_path: Path, monkeypatch, has_data_filter: bool) -> None:
    if not has_data_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    dest = engine.extract_vendored_llama_cpp(make_sdist(tmp_path / "s.tar.gz"), tmp_path / "src")
    assert (dest / "tools/server/README.md").read_text() == "# server\n"


def write_fake_server(path: Path, version_exit: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho 'version: 1 (fake)' >&2\nexit {version_exit}\n")
    path.chmod(0o755)
    return path


def test_find_llama_server_returns_the_newest_working_binary(tmp_path: Path) -> None:
    v = engine.LLAMA_CPP_PYTHON_VERSION
    older = write_fake_server(tmp_path / f"{v}-cpu-aaaa" / "bin" / "llama-server")
    newer = write_fake_server(tmp_path / f"{v}-cpu-bbbb" / "bin" / "llama-server")
    broken = write_fake_server(tmp_path / f"{v}-cpu-cccc" / "bin" / "llama-server", version_exit=1)
    write_fake_server(tmp_path / f"{v}-vulkan-dddd" / "bin" / "llama-server")
    write_fake_server(tmp_path / "0.0.1-cpu-eeee" / "bin" / "llama-server")
    now = time.time()
    os.utime(older, (now - 100, now - 100))
    os.utime(newer, (now - 10, now - 10))
    os.utime(broken, (now, now))
    assert engine.find_llama_server("cpu", root=tmp_path) == newer
    assert engine.find_llama_server("cuda", root=tmp_path) is None
    assert engine.find_llama_server("cpu", root=tmp_path / "nowhere") is None


def test_build_is_skipped_when_the_binary_exists_and_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ran = []
    monkeypatch.setattr(engine.subprocess, "run", lambda cmd, **kw: ran.append(cmd) or _real_run(cmd, **kw))
    sdist = make_sdist(tmp_path / "s.tar.gz")
    prefix = tmp_path / "prefix"
    write_fake_server(prefix / "bin" / "llama-server")
    for tool in engine.TOOL_TARGETS:
        write_fake_server(prefix / "bin" / tool)
    assert engine.build_engine("cpu", prefix=prefix, sdist=sdist) == prefix / "bin" / "llama-server"
    assert "already built" in capsys.readouterr().out
    assert not any(cmd[0] == "cmake" for cmd in ran)
    assert engine.find_tool("llama-quantize", root=tmp_path / "cache" / "clawbot" / "engine") is None  # other prefix


def test_a_build_without_the_tools_is_completed(tmp_path: Path, monkeypatch) -> None:
    """A prefix from before the tools were built beside llama-server gets them (the build tree is reused)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    sdist = make_sdist(tmp_path / "s.tar.gz")
    prefix = tmp_path / "prefix"
    write_fake_server(prefix / "bin" / "llama-server")
    asked = []

    def fake_build(accelerator, source_dir, build_dir, flags, prefix, wanted, jobs):
        asked.append(wanted)
        for target in wanted:
            write_fake_server(prefix / "bin" / target)
        return prefix / "bin" / "llama-server"

    monkeypatch.setattr(engine, "_configure_build_install", fake_build)
    engine.build_engine("cpu", prefix=prefix, sdist=sdist)
    assert asked == [["llama-server", *engine.TOOL_TARGETS]]
    assert "-DGGML_RPC=ON" in engine.cmake_flags("cpu")


_real_run = subprocess.run


def test_concurrent_builds_of_the_same_flags_build_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    sdist = make_sdist(tmp_path / "s.tar.gz")
    builds = []

    def slow_fake_build(accelerator, source_dir, build_dir, flags, prefix, wanted, jobs):
        builds.append(prefix)
        time.sleep(0.5)  # long enough for the other thread to reach the lock
        for tool in engine.TOOL_TARGETS:
            write_fake_server(prefix / "bin" / tool)
        return write_fake_server(prefix / "bin" / "llama-server")

    monkeypatch.setattr(engine, "_configure_build_install", slow_fake_build)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(engine.build_engine("cpu", sdist=sdist)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(builds) == 1
    assert len(results) == 2 and results[0] == results[1]


# --------------------------------------------------------------------------- the real build


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_build_engine_for_cpu_produces_a_working_llama_server() -> None:
    """Builds once per machine (minutes on 2 cores), then finds the cached binary."""
    cached_sdist = engine.cache_root() / "sdist" / f"llama_cpp_python-{engine.LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    binary = engine.build_engine("cpu", sdist=cached_sdist if cached_sdist.exists() else None, native=False)
    assert binary.is_file() and os.access(binary, os.X_OK)
    version = engine.engine_version(binary)
    assert version and f"llama-cpp-python-{engine.LLAMA_CPP_PYTHON_VERSION}" in version
    assert engine.find_llama_server("cpu") == binary
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "--load-mode" in help_text and "--metrics" in help_text
