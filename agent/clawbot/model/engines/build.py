"""`clawbot build-engine`: build `llama-server` from the llama.cpp vendored in the pinned llama-cpp-python sdist.

The same build installs the tools beside it (TOOL_TARGETS: `ggml-rpc-server` for a model split across nodes,
`llama-quantize`, `llama-imatrix` and `llama-perplexity` for quantizing and checking models), so every tool a
node or the control machine runs comes from one pinned source and one cache key; `find_tool` finds them.

Why from that sdist: the agent already pins llama-cpp-python, so taking llama.cpp from the very same
release keeps one pinned version for both the in-process fallback and the real model server, and it
comes from PyPI (the only source a node is sure to reach). The binary is built on the node itself
(GGML_NATIVE) and cached under a prefix named by version, accelerator and a hash of the build inputs,
so a second run with nothing changed does nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

# The one place the engine version is pinned; keep equal to the `llama` extra in pyproject.toml.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
ACCELERATORS = ("cpu", "cuda", "vulkan", "rocm")
SERVER_TARGET = "llama-server"
BENCH_TARGET = "llama-bench"
RPC_TARGET = "ggml-rpc-server"  # GGML_RPC: serves this node's memory to a llama-server elsewhere (never exposed)
TOOL_TARGETS = (RPC_TARGET, "llama-quantize", "llama-imatrix", "llama-perplexity")
VENDORED_LLAMA_CPP = "vendor/llama.cpp"
VERSION_CHECK_TIMEOUT_S = 30
# tool -> Debian/Ubuntu package: what compiling an engine needs, on the control machine or on a GPU node
BUILD_TOOLS = {"cmake": "cmake", "ninja": "ninja-build", "c++": "build-essential", "cc": "build-essential"}


def cache_root() -> Path:
    """Where sdists, sources, build trees and installed engines live (XDG cache, per user)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clawbot"


# --------------------------------------------------------------------------- pure flag logic


def parse_compute_capabilities(nvidia_smi_output: str) -> str:
    """Turn `nvidia-smi --query-gpu=compute_cap --format=csv,noheader` output into CMAKE_CUDA_ARCHITECTURES.

    "9.0" -> "90"; several GPUs give a sorted, de-duplicated ';' list ("86;90") so one binary serves all.
    """
    archs: set[int] = set()
    for line in nvidia_smi_output.splitlines():
        line = line.strip()
        if not line:
            continue
        match = re.fullmatch(r"(\d+)\.(\d+)", line)
        if not match:
            raise ValueError(f"unexpected compute capability {line!r} in nvidia-smi output")
        archs.add(int(match.group(1)) * 10 + int(match.group(2)))
    if not archs:
        raise ValueError("nvidia-smi reported no GPUs")
    return ";".join(str(a) for a in sorted(archs))


def normalize_cuda_arch(cuda_arch: str) -> str:
    """Accept "9.0", "90", "86;90" or "86,90" (as users type them) and return CMake's ';' form."""
    parts = [p.strip() for p in re.split(r"[;,\s]+", str(cuda_arch)) if p.strip()]
    if not parts:
        raise ValueError("empty CUDA architecture")
    out: list[str] = []
    for part in parts:
        if re.fullmatch(r"\d+\.\d+", part):
            out.append(parse_compute_capabilities(part))
        elif re.fullmatch(r"\d+[a-z]?(-real|-virtual)?", part) or part in ("native", "all", "all-major"):
            out.append(part)
        else:
            raise ValueError(f"invalid CUDA architecture {part!r} (expected e.g. 90 or 9.0)")
    return ";".join(out)


def cmake_flags(
    accelerator: str,
    cuda_arch: str | None = None,
    *,
    declared_options: Collection[str] | None = None,
    native: bool = True,
) -> list[str]:
    """The -D flags for one engine build; pure so every accelerator's path is unit-tested without its GPU.

    declared_options: options the vendored CMakeLists declare (see `declared_cmake_options`); flags that
    only some llama.cpp versions know (LLAMA_USE_PREBUILT_UI) are passed only when declared, since the
    prebuilt-UI switch otherwise downloads at build time, which a node may not be able to do.
    """
    if accelerator not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {accelerator!r}; choose one of {', '.join(ACCELERATORS)}")
    declared = set(declared_options or ())
    flags = [
        "-DCMAKE_BUILD_TYPE=Release",
        # One self-contained binary: nothing to keep in sync in lib/ beside it, safe to copy atomically.
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        # The RPC backend and ggml-rpc-server: a model split across nodes (only ever reached through mTLS tunnels).
        "-DGGML_RPC=ON",
        # Model files arrive through the deploy, never fetched by the server: no libcurl needed.
        "-DLLAMA_CURL=OFF",
        f"-DLLAMA_BUILD_COMMIT=llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}",
    ]
    if "LLAMA_BUILD_APP" in declared:
        flags.append("-DLLAMA_BUILD_APP=OFF")
    if "LLAMA_OPENSSL" in declared:
        # TLS terminates at clawbot's mTLS gateway; llama-server only listens on loopback.
        flags.append("-DLLAMA_OPENSSL=OFF")
    if "LLAMA_USE_PREBUILT_UI" in declared:
        flags.append("-DLLAMA_USE_PREBUILT_UI=OFF")
    flags.append(f"-DGGML_NATIVE={'ON' if native else 'OFF'}")
    if accelerator == "cuda":
        if not cuda_arch:
            raise ValueError("CUDA build needs a CUDA architecture (--cuda-arch, or a GPU nvidia-smi can see)")
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={normalize_cuda_arch(cuda_arch)}"]
    elif accelerator == "vulkan":
        flags.append("-DGGML_VULKAN=ON")
    elif accelerator == "rocm":
        flags.append("-DGGML_HIP=ON")
    return flags


def build_key(accelerator: str, flags: Sequence[str]) -> str:
    """`<version>-<accelerator>-<hash of flags>`: a changed flag gets its own prefix, never a stale binary."""
    digest = hashlib.sha256("\n".join([LLAMA_CPP_PYTHON_VERSION, accelerator, *flags]).encode()).hexdigest()
    return f"{LLAMA_CPP_PYTHON_VERSION}-{accelerator}-{digest[:12]}"


def declared_cmake_options(source_dir: Path) -> set[str]:
    """Names of `option(...)` in the top-level and ggml CMakeLists (what this llama.cpp understands)."""
    names: set[str] = set()
    for rel in ("CMakeLists.txt", "ggml/CMakeLists.txt"):
        path = source_dir / rel
        if path.exists():
            names |= set(re.findall(r"^\s*option\s*\(\s*([A-Za-z0-9_]+)", path.read_text(), re.MULTILINE))
    return names


# --------------------------------------------------------------------------- environment probes


def detect_cuda_arch(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> str | None:
    """Ask nvidia-smi for the GPUs' compute capability; None where there is no NVIDIA driver."""
    if run is subprocess.run and shutil.which("nvidia-smi") is None:
        return None
    try:
        proc = run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    try:
        return parse_compute_capabilities(proc.stdout)
    except ValueError:
        return None


def engine_version(binary: Path) -> str | None:
    """`llama-server --version` output if the binary runs, else None (a half-copied or foreign binary)."""
    try:
        proc = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True,
            timeout=VERSION_CHECK_TIMEOUT_S, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    text = (proc.stdout + proc.stderr).strip()
    return text if "version" in text else None


def find_llama_server(accelerator: str = "cpu", *, root: Path | None = None) -> Path | None:
    """The newest cached llama-server for this pinned version and accelerator that runs `--version`.

    Looks at every `<version>-<accelerator>-*` prefix rather than recomputing one hash, so the agent
    finds the engine without the sources or nvidia-smi at hand.
    """
    engines = (root or cache_root() / "engine")
    if not engines.is_dir():
        return None
    candidates = sorted(
        (p / "bin" / SERVER_TARGET for p in engines.glob(f"{LLAMA_CPP_PYTHON_VERSION}-{accelerator}-*")),
        key=lambda b: b.stat().st_mtime if b.exists() else 0,
        reverse=True,
    )
    for binary in candidates:
        if binary.is_file() and os.access(binary, os.X_OK) and engine_version(binary):
            return binary
    return None


def find_tool(name: str, accelerator: str = "cpu", *, root: Path | None = None) -> Path | None:
    """A tool of TOOL_TARGETS from the build that find_llama_server picks (same sources, same flags), or None."""
    if name not in TOOL_TARGETS:
        raise ValueError(f"unknown engine tool {name!r}; the build installs {', '.join(TOOL_TARGETS)}")
    server = find_llama_server(accelerator, root=root)
    tool = server.with_name(name) if server is not None else None
    return tool if tool is not None and tool.is_file() and os.access(tool, os.X_OK) else None


# --------------------------------------------------------------------------- sources


def fetch_sdist(cache_dir: Path) -> Path:
    """Download the pinned sdist once with pip (PyPI is the one registry every node reaches)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    target = cache_dir / name
    if target.exists():
        return target
    _say(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist into {cache_dir}")
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp],
            check=True,
        )
        found = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if len(found) != 1:
            raise RuntimeError(f"pip download produced {found!r}, expected one {name}")
        os.replace(found[0], target)
    return target


def extract_vendored_llama_cpp(sdist: Path, dest: Path) -> Path:
    """Unpack only vendor/llama.cpp from the sdist into dest (atomically: temp dir, then rename)."""
    if (dest / "CMakeLists.txt").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        members = tar.getmembers()
        top = members[0].name.split("/", 1)[0]
        prefix = f"{top}/{VENDORED_LLAMA_CPP}/"
        wanted = []
        for member in members:
            if member.name.startswith(prefix):
                member.name = member.name[len(prefix):]
                # `.git` is a submodule pointer into the sdist author's checkout: it only makes cmake's
                # git probes print "fatal: not a git repository".
                if member.name and member.name != ".git":
                    wanted.append(member)
        if not wanted:
            raise RuntimeError(f"{sdist} has no {VENDORED_LLAMA_CPP}/ (not a llama-cpp-python sdist?)")
        tmp = tempfile.mkdtemp(dir=dest.parent, prefix=".extract-")
        try:
            _extract_safely(tar, wanted, tmp)
            try:
                os.rename(tmp, dest)
            except OSError:
                # Another build-engine run extracted the same tree first (renames are atomic, so theirs is
                # complete, and a build may be reading it): keep theirs.
                if not (dest / "CMakeLists.txt").exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def _extract_safely(tar: tarfile.TarFile, members: list[tarfile.TarInfo], dest: str) -> None:
    """Extract refusing absolute paths, `..` and links out of dest.

    tarfile's "data" filter does exactly that but only exists from Python 3.11.4; Debian 12 ships 3.11.2.
    """
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, members=members, filter="data")
        return
    root = os.path.realpath(dest)
    for member in members:
        target = os.path.realpath(os.path.join(root, member.name))
        if os.path.isabs(member.name) or os.path.commonpath([root, target]) != root:
            raise RuntimeError(f"refusing to extract {member.name!r} outside {dest}")
        if member.issym() or member.islnk():
            link = os.path.realpath(os.path.join(os.path.dirname(target), member.linkname))
            if os.path.isabs(member.linkname) or os.path.commonpath([root, link]) != root:
                raise RuntimeError(f"refusing link {member.name!r} -> {member.linkname!r} outside {dest}")
        if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
            raise RuntimeError(f"refusing special file {member.name!r}")
    tar.extractall(dest, members=members)


# --------------------------------------------------------------------------- build


def _say(message: str) -> None:
    print(f"[build-engine] {message}", flush=True)


def default_prefix(key: str) -> Path:
    return cache_root() / "engine" / key


def build_engine(
    accelerator: str = "cpu",
    *,
    cuda_arch: str | None = None,
    jobs: int | None = None,
    prefix: Path | None = None,
    sdist: Path | None = None,
    source_dir: Path | None = None,
    with_bench: bool = False,
    native: bool = True,
) -> Path:
    """Build (or reuse) llama-server for one accelerator; returns the installed binary's path.

    native=False builds a binary to copy to other machines: ggml then targets the AVX2/FMA/F16C level
    (any x86-64 CPU since about 2013) instead of this CPU's exact instruction set.
    """
    if accelerator not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {accelerator!r}; choose one of {', '.join(ACCELERATORS)}")
    if accelerator == "cuda" and cuda_arch:
        cuda_arch = normalize_cuda_arch(cuda_arch)  # refuse a typo before minutes of download and extraction
    if accelerator == "cuda" and not cuda_arch:
        cuda_arch = detect_cuda_arch()
        if not cuda_arch:
            raise RuntimeError("no CUDA architecture: nvidia-smi found no GPU; pass --cuda-arch (e.g. 90)")
        _say(f"detected CUDA architecture {cuda_arch}")
    root = cache_root()
    if source_dir is None:
        sdist = sdist or fetch_sdist(root / "sdist")
        source_dir = extract_vendored_llama_cpp(sdist, root / "src" / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}")
    elif not (Path(source_dir) / "CMakeLists.txt").is_file():
        raise RuntimeError(f"{source_dir} has no CMakeLists.txt: not a llama.cpp source tree")
    source_dir = Path(source_dir).resolve()
    flags = cmake_flags(accelerator, cuda_arch, declared_options=declared_cmake_options(source_dir), native=native)
    key = build_key(accelerator, flags)
    prefix = prefix or default_prefix(key)
    wanted = [SERVER_TARGET, *TOOL_TARGETS] + ([BENCH_TARGET] if with_bench else [])
    installed = prefix / "bin" / SERVER_TARGET
    if _installed(prefix, wanted):
        _say(f"already built: {installed}")
        return installed

    build_dir = root / "build" / key
    build_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(build_dir.parent / f"{key}.lock"):
        # Another process (a deploy, a test fixture) may have finished the same build while we waited.
        if _installed(prefix, wanted):
            _say(f"already built: {installed}")
            return installed
        return _configure_build_install(accelerator, source_dir, build_dir, flags, prefix, wanted, jobs)


def _installed(prefix: Path, wanted: list[str]) -> bool:
    """Every wanted binary is there; llama-server (and llama-bench) also run `--version` (the tools take no such
    flag the same way, so they only need to be executable files)."""
    for target in wanted:
        binary = prefix / "bin" / target
        if target in TOOL_TARGETS:
            if not (binary.is_file() and os.access(binary, os.X_OK)):
                return False
        elif not engine_version(binary):
            return False
    return True


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """One build per build tree at a time: two ninjas in one directory corrupt each other's outputs."""
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another build-engine run holding {lock_path}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _configure_build_install(accelerator: str, source_dir: Path, build_dir: Path, flags: list[str],
                             prefix: Path, wanted: list[str], jobs: int | None) -> Path:
    installed = prefix / "bin" / SERVER_TARGET
    configure = ["cmake", "-S", str(source_dir), "-B", str(build_dir), *flags]
    if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
        # A generator is fixed at first configure; an existing build tree keeps its own.
        configure[1:1] = ["-G", "Ninja"]
    jobs = jobs or os.cpu_count() or 1
    started = time.monotonic()
    _say(f"configuring {accelerator} build of llama.cpp from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}")
    _say("cmake flags: " + " ".join(flags))
    subprocess.run(configure, check=True)
    configured = time.monotonic()
    _say(f"configured in {configured - started:.0f} s; compiling {', '.join(wanted)} with {jobs} jobs")
    subprocess.run(["cmake", "--build", str(build_dir), "--target", *wanted, "-j", str(jobs)], check=True)
    built = time.monotonic()
    _say(f"compiled in {built - configured:.0f} s")

    (prefix / "bin").mkdir(parents=True, exist_ok=True)
    for target in wanted:
        _install_atomically(build_dir / "bin" / target, prefix / "bin" / target)
    info = {
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
        "accelerator": accelerator,
        "cmake_flags": flags,
        "targets": wanted,
        "configure_seconds": round(configured - started, 1),
        "compile_seconds": round(built - configured, 1),
        "jobs": jobs,
    }
    (prefix / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
    version = engine_version(installed)
    if not version:
        raise RuntimeError(f"{installed} was built but does not run `--version`")
    _say(f"installed {installed} ({version.splitlines()[0]}) in {built - started:.0f} s total")
    return installed


def _install_atomically(source: Path, target: Path) -> None:
    """Copy then rename, so a running supervisor never execs a half-written binary."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.copy2(source, tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--accelerator", choices=ACCELERATORS, default="cpu", help="GPU backend (default cpu)")
    parser.add_argument("--cuda-arch", help="CMAKE_CUDA_ARCHITECTURES, e.g. 90 or 9.0 (default: ask nvidia-smi)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    parser.add_argument("--prefix", type=Path, default=None,
                        help="install prefix (default ~/.cache/clawbot/engine/<version>-<accel>-<hash>)")
    parser.add_argument("--sdist", type=Path, default=None,
                        help=f"use this llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist instead of pip download")
    parser.add_argument("--source-dir", type=Path, default=None,
                        help="build from this llama.cpp source tree (the sdist's vendor/llama.cpp, e.g. carried to "
                             "a node without internet) instead of the sdist")
    parser.add_argument("--with-bench", action="store_true", help="also build llama-bench")
    parser.add_argument("--portable", action="store_true",
                        help="build for any AVX2-class CPU (to copy to other nodes) instead of -march=native")


def run(args: argparse.Namespace) -> int:
    try:
        binary = build_engine(
            args.accelerator, cuda_arch=args.cuda_arch, jobs=args.jobs,
            prefix=args.prefix, sdist=args.sdist, source_dir=args.source_dir, with_bench=args.with_bench, native=not args.portable,
        )
    except (RuntimeError, ValueError, subprocess.CalledProcessError) as exc:
        print(f"clawbot build-engine: {exc}", file=sys.stderr)
        return 1
    print(binary)
    return 0
