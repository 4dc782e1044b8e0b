"""GPU model-node benchmark: the engine's own ceiling, raw llama-server and the full clawbot stack on one GPU, same
model, same run; energy per token; speculative decoding; and (phase cpu) the thread sweep and llama_cpp.server.

    bash benchmarks/bench_gpu.sh [--phase gpu|cpu|spec] [--out FILE]   # on the GPU machine: offline setup, then this
    python benchmarks/bench_gpu.py --source-dir DIR [--out benchmarks/results/gpu.json]

Phase gpu (all on the machine with the GPU), each step skipped when the time budget (--budget-s) is short, the
results file rewritten after each step:
1. build the engine for the accelerator (`clawbot build-engine`: llama-server + llama-bench, CMAKE_CUDA_ARCHITECTURES
   from nvidia-smi) while the model (Llama-3-8B shapes, Q4_0, random weights: speed does not depend on the weights'
   values) and a draft model (Llama-3.2-1B shapes, the same vocabulary) are generated next to it, into /dev/shm;
2. llama-bench: pp512 and tg128 at depth 0 and at the prompt's depth (-d), at clawbot's -t/-ub/-b, plus tg at -t 1;
3. the clawbot agent behind its mTLS gateway against raw llama-server with the very command line the supervisor
   builds, in alternating rounds (1 and 4 streams, the prompt, 128 output tokens, ignore_eos), with the GPU's energy
   (NVML) per output token and per request, and once through the gateway's /metrics;
4. speculative decoding (raw llama-server, 1 stream, greedy): off, n-gram variants, the draft model; acceptance
   rates from llama-server's timings, and whether greedy output stays the same;
5. raw llama-server variants, one flag each, for the per-token gap: -t 1, --backend-sampling, both; server-side
   decode (timings) beside the client's, sampled and greedy.
Phase cpu: CPU only (CUDA_VISIBLE_DEVICES empty, the same build): llama-bench thread sweep, the clawbot agent at
`threads: 0` (cores - 1) and at every core, n-gram speculation on the CPU, and llama_cpp.server (the crash of
issue 16: its output, a native backtrace through cuda-gdb when it crashes, then 4 streams vs llama-server).
Phase spec: speculative decoding on any model (--model, e.g. the demo Gemma 3 270M on this machine's CPU).
Writes the results JSON (naming the GPU) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from clawbot.common import preflight, sizing  # noqa: E402
from clawbot.model.engines import Paths, llama_server  # noqa: E402
from clawbot.model.engines import build as engine  # noqa: E402
from clawbot.model.runplan import RunPlan  # noqa: E402
from clawbot.tools import bench  # noqa: E402
from clawbot.common.config import load_config  # noqa: E402
from tests.fixtures_agent import Agent, agent_config, free_port, make_pki, wait_for  # noqa: E402

# Targets: issue 9 (full stack vs raw llama-server, first token through the gateway) and issue 16 (full-stack
# per-token time within 1.05x of llama-bench's at the same depth).
TARGET_RATIO = 0.95
TARGET_TTFT_MS = 60.0
TARGET_PER_TOKEN_RATIO = 1.05
# Speculative decoding variants: name -> llama-server arguments
SPEC_VARIANTS = {
    "off": [],
    "ngram-mod 24/48/64": ["--spec-type", "ngram-mod", "--spec-ngram-mod-n-match", "24", "--spec-ngram-mod-n-min",
                           "48", "--spec-ngram-mod-n-max", "64"],
    "ngram-mod 12/4/16": ["--spec-type", "ngram-mod", "--spec-ngram-mod-n-match", "12", "--spec-ngram-mod-n-min",
                          "4", "--spec-ngram-mod-n-max", "16"],
    "ngram-simple": ["--spec-type", "ngram-simple"],
}
GREEDY_PROMPT = ("Rewrite the following function with type hints, keeping everything else the same:\n\n"
                 "def area(width, height):\n    if width < 0 or height < 0:\n        raise ValueError('negative')\n"
                 "    return width * height\n\n"
                 "def perimeter(width, height):\n    if width < 0 or height < 0:\n        raise ValueError('negative')\n"
                 "    return 2 * (width + height)\n")

# Different texts per request: llama.cpp's ngram-mod pool is shared by every request, so one prompt sent again and
# again would count the earlier replies' n-grams as hits.
CODE_SNIPPETS = (
    "def area(width, height):\n    if width < 0 or height < 0:\n        raise ValueError('negative')\n"
    "    return width * height\n\ndef perimeter(width, height):\n    if width < 0 or height < 0:\n"
    "        raise ValueError('negative')\n    return 2 * (width + height)\n",
    "def mean(values):\n    total = 0\n    for value in values:\n        total += value\n"
    "    return total / len(values)\n\ndef clamp(value, low, high):\n    return max(low, min(value, high))\n",
    "def read_lines(path):\n    with open(path) as handle:\n        return [line.rstrip() for line in handle]\n\n"
    "def write_lines(path, lines):\n    with open(path, 'w') as handle:\n        for line in lines:\n"
    "            handle.write(line + '\\n')\n",
    "class Counter:\n    def __init__(self):\n        self.counts = {}\n\n    def add(self, key):\n"
    "        self.counts[key] = self.counts.get(key, 0) + 1\n\n    def most_common(self):\n"
    "        return max(self.counts, key=self.counts.get)\n",
)
FREE_PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, for a ten-year-old.",
    "Describe a walk through a busy market on a rainy morning.",
    "What should someone consider before adopting a dog?",
)


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, seconds: float, what: str, results: dict) -> bool:
        if self.left() >= seconds:
            return True
        results.setdefault("skipped", []).append(f"{what}: {self.left():.0f} s left, needs ~{seconds:.0f} s")
        print(f"[bench-gpu] SKIP {what}: {self.left():.0f} s left", flush=True)
        return False


def say(text: str) -> None:
    print(f"[bench-gpu] {text}", flush=True)


def gpu_facts() -> dict:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,compute_cap,"
                              "power.limit,clocks.max.sm", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    first = [p.strip() for p in out.strip().splitlines()[0].split(",")]
    return {"name": first[0], "driver": first[1], "memory_total_mib": int(float(first[2])),
            "memory_used_mib": int(float(first[3])), "compute_cap": first[4], "power_limit_w": first[5],
            "max_sm_clock_mhz": first[6], "count": len(out.strip().splitlines())}


def cpu_facts() -> dict:
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        isa = sorted(f for f in flags.split() if f.startswith(("avx512", "amx", "avx2", "avx_vnni")))
    except (OSError, StopIteration):
        isa = []
    return {"model": name, "cpus": os.cpu_count(), "usable_cores": preflight.usable_cores(), "isa": isa}


def run_llama_bench(binary: Path, model: Path, extra: list[str], log: Path, timeout: float = 300) -> list[dict]:
    cmd = [str(binary), "-m", str(model), *extra, "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    with open(log, "a") as handle:
        handle.write(" ".join(cmd) + "\n" + proc.stderr + "\n")
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rows = json.loads(proc.stdout)
    out = []
    for r in rows:
        test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        depth = r.get("n_depth", 0)
        out.append({"test": test + (f"@d{depth}" if depth else ""), "n_prompt": r["n_prompt"], "n_gen": r["n_gen"],
                    "n_depth": depth, "threads": r.get("n_threads"), "avg_tok_s": round(r["avg_ts"], 2),
                    "stddev_tok_s": round(r["stddev_ts"], 2),
                    "ms_per_token": round(1000 / r["avg_ts"], 3) if r["avg_ts"] else None,
                    "n_gpu_layers": r.get("n_gpu_layers"), "flash_attn": r.get("flash_attn"),
                    "n_ubatch": r.get("n_ubatch"), "backends": r.get("backends"), "gpu_info": r.get("gpu_info"),
                    "cpu_info": r.get("cpu_info"), "build": r.get("build_commit")})
    return out


class RawServer:
    """llama-server started directly (own process group), no agent, no gateway, no API key."""

    def __init__(self, cmd: list[str], port: int, log_path: Path, env: dict | None = None):
        self.cmd, self.port, self.log_path, self.env = cmd, port, log_path, env
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600, health: str = "/health") -> float:
        began = time.perf_counter()
        with open(self.log_path, "ab") as log:
            log.write(("\n$ " + " ".join(self.cmd) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=self.env)

        def healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                return httpx.get(self.url + health, timeout=5).status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(healthy, timeout, 0.2, "raw server health")
        return time.perf_counter() - began

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def run_bench(url: str, levels: list[int], args, pki=None, api_key: str | None = None, requests: int | None = None,
              max_tokens: int | None = None, prompt_tokens: int | None = None, energy: str = "auto",
              temperature: float = 0.7, prompt: str | None = None) -> dict:
    tls = dict(cacert=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key)) if pki else {}
    return asyncio.run(bench.bench(url, concurrency=levels, requests=requests or args.requests,
                                   prompt_tokens=prompt_tokens or args.prompt_tokens,
                                   max_tokens=max_tokens or args.max_tokens, ignore_eos=True, api_key=api_key,
                                   energy=energy, temperature=temperature, prompt=prompt, **tls))


def level(report: dict, concurrency: int) -> dict:
    return next(lv for lv in report["levels"] if lv["concurrency"] == concurrency)


def _med(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def medians(reports: list[dict]) -> dict:
    out = {}
    for lv in reports[0]["levels"]:
        c = lv["concurrency"]
        same = [level(r, c) for r in reports]
        energy = [x.get("energy") or {} for x in same]
        out[str(c)] = {
            "rounds": len(same),
            "output_tok_s": _med(x["output_throughput_tok_s"] for x in same),
            "ttft_p50_ms": _med(x["ttft_ms"]["p50"] for x in same),
            "itl_p50_ms": _med(x["itl_ms"]["p50"] for x in same),
            "tpot_p50_ms": _med(x["tpot_ms"]["p50"] for x in same),
            "decode_tok_s_per_stream": _med(x["decode_tok_s_per_stream"] for x in same),
            "server_decode_tok_s": _med(x.get("server_decode_tok_s_p50") for x in same),
            "joules_per_output_token": _med(e.get("joules_per_output_token") for e in energy),
            "joules_per_output_token_above_idle": _med(e.get("joules_per_output_token_above_idle") for e in energy),
            "joules_per_request": _med(e.get("joules_per_request") for e in energy),
            "mean_power_w": _med(e.get("mean_power_w") for e in energy),
            "power_samples": sum(e.get("samples") or 0 for e in energy),
            "sample_interval_s": _med(e.get("interval_s") for e in energy),
            "failed": sum(x["failed"] for x in same),
        }
    return out


def generate_model(path: Path, preset: str, quant: str, log_dir: Path) -> subprocess.Popen:
    log = open(log_dir / f"make-model-{preset}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "clawbot", "make-model", "--preset", preset, "--quant", quant,
                             str(path)], stdout=log, stderr=subprocess.STDOUT)


def models_dir(work: Path, need_gib: float) -> Path:
    """tmpfs when it has room (writing 4.5 GB to the VM's disk took minutes), else the work folder."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > (need_gib + 2) * 2**30:
            (shm / "clawbot-models").mkdir(exist_ok=True)
            return shm / "clawbot-models"
    except OSError:
        pass
    return work


def ensure_models(args, work: Path, logs: Path, draft: bool) -> tuple[dict, dict]:
    """Start generating what is missing; returns ({name: path}, {name: Popen})."""
    where = models_dir(work, 6)
    wanted = {"main": (args.preset, args.quant)}
    if draft:
        wanted["draft"] = (args.draft_preset, args.quant)
    paths, procs = {}, {}
    for name, (preset, quant) in wanted.items():
        path = where / f"{preset}-{quant}.gguf"
        paths[name] = path
        if not path.exists() and path not in (paths[n] for n in procs):
            procs[name] = generate_model(path.with_suffix(".tmp"), preset, quant, logs)
    return paths, procs


def finish_models(paths: dict, procs: dict, logs: Path) -> None:
    for name, proc in procs.items():
        if proc.wait() != 0:
            raise RuntimeError(f"make-model {name} failed: " + "".join(
                p.read_text()[-2000:] for p in logs.glob("make-model-*.log")))
        paths[name].with_suffix(".tmp").rename(paths[name])


def build_llama_cpp_python(src_tar: Path, llama_src: Path, work: Path, logs: Path,
                           nice: bool = True, site_name: str = "llcp-site",
                           extra_cmake: str = "") -> subprocess.Popen | None:
    """pip-build llama-cpp-python (its sdist's Python part + the carried vendor/llama.cpp) into work/llcp-site, native
    CPU build as on the host of issue 16; in the background."""
    site = work / site_name
    if (site / "llama_cpp" / "__init__.py").exists() or not src_tar.exists():
        return None
    root = work / "llcp-src"
    if not (root / "llama_cpp_python-0.3.36" / "pyproject.toml").exists():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-xzf", str(src_tar), "-C", str(root)], check=True)
        vendor = root / "llama_cpp_python-0.3.36" / "vendor"
        vendor.mkdir(exist_ok=True)
        if not (vendor / "llama.cpp").exists():
            os.symlink(llama_src, vendor / "llama.cpp")
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
                                       "-DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF " + extra_cmake,
           "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 4)}
    log = open(logs / f"llama-cpp-python-build-{site_name}.log", "wb")
    return subprocess.Popen([*(["nice", "-n", "5"] if nice else []), sys.executable, "-m", "pip", "install", "-v",
                             "--no-index", "--no-deps",
                             "--no-build-isolation", "--no-cache-dir", "--target", str(site),
                             str(root / "llama_cpp_python-0.3.36")], stdout=log, stderr=subprocess.STDOUT, env=env)


def greedy_text(url: str, n: int = 64, api_key: str | None = None) -> tuple[str, dict]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    r = httpx.post(url + "/v1/completions", json={"prompt": GREEDY_PROMPT, "max_tokens": n, "temperature": 0,
                                                   "ignore_eos": True}, timeout=300, headers=headers)
    r.raise_for_status()
    body = r.json()
    return body["choices"][0]["text"], body.get("timings") or {}


def first_difference(a: str, b: str) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def plan_and_command(config: dict, model: Path, binary: Path, accelerator_builds: frozenset[str], port: int,
                     **server) -> tuple[RunPlan, list[str], dict]:
    full = {**config, "model_server": {**config["model_server"], **server, "port": port}}
    facts = preflight.host_facts(preflight.read_node(str(model)), engine_builds=accelerator_builds)
    plan = RunPlan.resolve(full, facts, sizing.read_model_info(model))
    return plan, llama_server.command(plan, full, Paths(model=str(model), binary=str(binary))), full


def with_flag(cmd: list[str], flag: str, value: str | None = None) -> list[str]:
    """cmd with `flag value` set (replaced when present), or the bare flag appended."""
    out = list(cmd)
    if value is None:
        return out + [flag]
    if flag in out:
        out[out.index(flag) + 1] = value
        return out
    return out + [flag, value]


def server_variant(cmd: list[str], port: int) -> list[str]:
    return with_flag(cmd, "--port", str(port))


# --------------------------------------------------------------------------- phase gpu


def phase_gpu(args, results: dict, save, budget: Budget) -> None:
    work = Path(args.work)
    logs = work / "logs"
    t = time.perf_counter()
    paths, procs = ensure_models(args, work, logs, draft=True)
    gen_started = time.perf_counter()
    server_bin = Path(args.engine_binary) if args.engine_binary else \
        engine.build_engine(args.accelerator, source_dir=args.source_dir, with_bench=True)
    info_path = server_bin.parent.parent / "build-info.json"
    results["engine"] = {"binary": str(server_bin), "seconds_this_run": round(time.perf_counter() - t, 1),
                         "build_info": json.loads(info_path.read_text()) if info_path.exists() else None,
                         "version": engine.engine_version(server_bin)}
    say(f"engine ready: {results['engine']['seconds_this_run']} s")
    finish_models(paths, procs, logs)
    results["model_generation_s"] = round(time.perf_counter() - gen_started, 1) if procs else 0
    model, draft = paths["main"], paths["draft"]
    results["model"] = {"preset": args.preset, "quant": args.quant, "bytes": model.stat().st_size,
                        "gib": round(model.stat().st_size / 2**30, 2), "path": str(model)}
    results["draft_model"] = {"preset": args.draft_preset, "quant": args.quant, "gib": round(draft.stat().st_size / 2**30, 2)}
    save()

    pki = make_pki(work / "pki")
    config = agent_config(model, pki.tls_config(), gateway_port=free_port(), model_port=free_port(),
                          model_gateway={"max_tokens": min(1024, args.context // 4), "max_concurrency": args.slots,
                                         "queue_length": 64, "queue_timeout_s": 300, "request_timeout_s": 600,
                                         "rate_limit": {"requests_per_second": 1000, "burst": 1000},
                                         "allowed_clients": []},
                          model_server={"parallel_slots": 0, "threads": 0, "startup_timeout_s": 600,
                                        "accelerator": "auto" if args.accelerator == "cuda" else args.accelerator,
                                        "gpu_layers": -1, "flash_attention": "auto", "load_mode": "auto",
                                        "model_name": args.preset},
                          context_window=args.context)
    agent_dir = work / "agent"
    agent_dir.mkdir(parents=True, exist_ok=True)
    (agent_dir / "clawbot.json").write_text(json.dumps(config, indent=2))
    full = load_config(str(agent_dir / "clawbot.json"))  # schema defaults filled in, as the agent sees it
    raw_port = free_port()
    plan, raw_cmd, _ = plan_and_command(full, model, server_bin, frozenset({args.accelerator}), raw_port)
    results["run_plan"] = plan.to_json()
    results["raw_llama_server_command"] = raw_cmd[1:]
    bench_bin = server_bin.parent / engine.BENCH_TARGET
    ub, b = raw_cmd[raw_cmd.index("-ub") + 1], raw_cmd[raw_cmd.index("-b") + 1]
    threads = raw_cmd[raw_cmd.index("-t") + 1]

    # 2. the engine's ceiling, at depth 0 and at the prompt's depth; and the CPU threads' share (-t 1)
    if budget.allows(60, "llama-bench", results) and bench_bin.exists():
        common = ["-ngl", "99", "-fa", "1", "-ub", ub, "-b", b]
        results["llama_bench"] = run_llama_bench(bench_bin, model, common + [
            "-p", str(args.prompt_tokens), "-n", str(args.max_tokens), "-d", f"0,{args.prompt_tokens}", "-r", "3",
            "-t", threads], logs / "llama-bench.log")
        results["llama_bench"] += run_llama_bench(bench_bin, model, common + [
            "-p", "0", "-n", str(args.max_tokens), "-d", str(args.prompt_tokens), "-r", "3", "-t", "1"],
            logs / "llama-bench.log")
        say("llama-bench: " + "; ".join(f"{r['test']} t{r['threads']} {r['avg_tok_s']} tok/s"
                                        for r in results["llama_bench"]))
        save()

    # 3. raw llama-server vs the full stack, alternating rounds, with energy
    if budget.allows(100, "raw vs full stack", results):
        raw = RawServer(raw_cmd, raw_port, logs / "llama-server-raw.log")
        results["raw_load_s"] = round(raw.start(), 2)
        agent = Agent(agent_dir / "clawbot.json", agent_dir / "state", pki).start()
        try:
            t = time.perf_counter()
            status = wait_agent_ready(agent, timeout=600)
            results["agent_start_to_ready_s"] = round(time.perf_counter() - t, 2)
            results["agent_model_server_command"] = status.get("model", {}).get("command")
            results["agent_plan"] = status.get("model", {}).get("plan")
            rounds: dict[str, list] = {"raw": [], "gateway": []}
            for n in range(args.rounds):
                if n and not budget.allows(40, f"round {n + 1}", results):
                    break
                rounds["raw"].append(run_bench(raw.url, [1, 4], args))
                rounds["gateway"].append(run_bench(agent.url, [1, 4], args, pki=pki))
                say(f"round {n + 1}: raw {medians(rounds['raw'])} gateway {medians(rounds['gateway'])}")
            results["rounds"] = rounds
            # the agent's own power series, as Prometheus would scrape them (docs/monitoring.md)
            text = agent.get("/metrics").text
            results["agent_metrics_power"] = [line for line in text.splitlines()
                                              if line.startswith(("clawbot_node_power", "clawbot_node_energy"))]
            via_metrics = run_bench(agent.url, [1], args, pki=pki, energy="metrics", requests=4)
            results["energy_via_gateway_metrics"] = level(via_metrics, 1).get("energy")
        finally:
            agent.stop()
            raw.stop()
            (logs / "agent.log").write_text(agent.log()[-200000:] if agent.log_path.exists() else "")
        results["raw_llama_server"], results["gateway"] = medians(rounds["raw"]), medians(rounds["gateway"])
        save()

    # 4. speculative decoding on the GPU
    if budget.allows(40, "speculative decoding", results):
        results["speculative_gpu"] = spec_sweep(args, raw_cmd, logs, budget, results,
                                                draft=draft, draft_ngl="all", save=save)

    # 5. raw llama-server, one flag at a time: where does the per-token gap go?
    variants = {"clawbot": raw_cmd, "-t 1": with_flag(raw_cmd, "-t", "1"),
                "--backend-sampling": with_flag(raw_cmd, "--backend-sampling"),
                "-t 1 --backend-sampling": with_flag(with_flag(raw_cmd, "-t", "1"), "--backend-sampling")}
    results["gap_variants"] = {}
    for name, cmd in variants.items():
        if not budget.allows(25, f"variant {name}", results):
            break
        port = free_port()
        try:
            with RawServer(server_variant(cmd, port), port, logs / "llama-server-variants.log") as server:
                report = run_bench(server.url, [1], args, energy="off")
                greedy = run_bench(server.url, [1], args, energy="off", temperature=0.0, requests=4)
            results["gap_variants"][name] = {"sampled": medians([report])["1"], "greedy": medians([greedy])["1"]}
        except (RuntimeError, AssertionError, httpx.HTTPError) as exc:
            results["gap_variants"][name] = {"error": str(exc)[-1500:]}
        say(f"variant {name}: {results['gap_variants'][name]}")
        save()



def spec_sweep(args, base_cmd: list[str], logs: Path, budget: Budget, results: dict, *, draft: Path | None,
               draft_ngl: str, save, env: dict | None = None, requests: int = 4, max_tokens: int | None = None,
               prompt_tokens: int | None = None, prompts: dict | None = None) -> dict:
    """Each variant on raw llama-server, 1 stream: greedy decode rate and acceptance, and the greedy text against
    the `off` variant's (speculation must not change greedy output)."""
    variants = dict(SPEC_VARIANTS)
    if draft is not None:
        variants["draft model"] = ["--spec-type", "draft-simple", "-md", str(draft), "-ngld", draft_ngl,
                                   "--spec-draft-n-max", str(llama_server.DRAFT_MAX)]
    prompts = prompts or {"filler": None}
    out: dict = {}
    reference: str | None = None
    for name, extra in variants.items():
        if not budget.allows(25, f"spec {name}", results):
            break
        port = free_port()
        entry: dict = {"args": extra}
        try:
            with RawServer(server_variant(base_cmd, port) + extra, port, logs / "llama-server-spec.log",
                           env=env) as server:
                for label, prompt in prompts.items():
                    report = run_bench(server.url, [1], args, energy="auto", temperature=0.0, requests=requests,
                                       max_tokens=max_tokens, prompt_tokens=prompt_tokens, prompt=prompt)
                    lv = level(report, 1)
                    entry[label] = {**medians([report])["1"], "speculative": lv.get("speculative")}
                text, timings = greedy_text(server.url, n=64)
                entry["greedy_text_timings"] = timings
                if reference is None:
                    reference = text
                    entry["greedy_text"] = text
                else:
                    diff = first_difference(reference, text)
                    entry["greedy_same_as_off"] = diff is None
                    entry["greedy_first_difference_at_char"] = diff
        except (RuntimeError, AssertionError, httpx.HTTPError) as exc:
            entry["error"] = str(exc)[-1500:]
        out[name] = entry
        say(f"spec {name}: " + json.dumps({k: v for k, v in entry.items() if k not in ("args", "greedy_text")})[:600])
        results["_spec_partial"] = out
        save()
    results.pop("_spec_partial", None)
    return out


# --------------------------------------------------------------------------- phase cpu


def phase_cpu(args, results: dict, save, budget: Budget) -> None:
    """CPU only, with the GPU hidden: the thread sweep, the agent at threads 0 vs every core, n-gram speculation,
    llama_cpp.server."""
    work = Path(args.work)
    logs = work / "logs"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CUDA build runs on the CPU backend alone (no second build)
    paths, procs = ensure_models(args, work, logs, draft=False)
    cuda_bin = Path(args.engine_binary) if args.engine_binary else engine.find_llama_server("cuda")
    if cuda_bin is not None:
        # the agent looks for a `cpu` build: point one at the CUDA build (same ggml-cpu code, GPU hidden)
        alias = engine.cache_root() / "engine" / f"{engine.LLAMA_CPP_PYTHON_VERSION}-cpu-fromcuda" / "bin"
        alias.mkdir(parents=True, exist_ok=True)
        for name in (engine.SERVER_TARGET, engine.BENCH_TARGET):
            if not (alias / name).exists():
                os.symlink(cuda_bin.parent / name, alias / name)
        server_bin = alias / engine.SERVER_TARGET
        results["engine"] = {"binary": str(cuda_bin), "note": "the CUDA build with CUDA_VISIBLE_DEVICES empty"}
    else:
        server_bin = engine.build_engine("cpu", source_dir=args.source_dir, with_bench=True)
        results["engine"] = {"binary": str(server_bin), "note": "a CPU build made in this phase"}
    finish_models(paths, procs, logs)
    model = paths["main"]
    results["model"] = {"preset": args.preset, "quant": args.quant, "gib": round(model.stat().st_size / 2**30, 2)}
    llcp = build_llama_cpp_python(Path(args.llama_cpp_python_src), args.source_dir or Path("."), work, logs) \
        if args.llama_cpp_python_src and args.source_dir else None
    if llcp is not None:  # a fresh machine: the build must finish before the sweep runs beside it
        llcp.wait()
        results["llama_cpp_python_build_rc"] = llcp.returncode
    cores = preflight.usable_cores() or os.cpu_count() or 1
    bench_bin = server_bin.parent / engine.BENCH_TARGET

    # 1. llama-bench thread sweep (tg and pp), CPU only
    if budget.allows(120, "thread sweep", results):
        counts = sorted({c for c in (1, 2, 4, 8, 12, cores - 2, cores - 1, cores) if 1 <= c <= cores})
        counts = [c for c in counts if c >= 4] if cores >= 8 else counts
        results["thread_sweep"] = run_llama_bench(bench_bin, model, [
            "-ngl", "0", "-p", "128", "-n", "64", "-r", "2", "-t", ",".join(map(str, counts))],
            logs / "llama-bench-threads.log", timeout=max(60, budget.left() - 200))
        say("thread sweep: " + "; ".join(f"{r['test']} t{r['threads']} {r['avg_tok_s']}" for r in results["thread_sweep"]))
        save()

    # 2. the full stack at threads 0 (the rule) and at every core, 1 and 4 streams
    pki = make_pki(work / "pki-cpu")
    results["agent_threads"] = {}
    for label, threads in (("threads 0 (auto)", 0), (f"threads {cores}", cores)):
        if not budget.allows(70, f"agent {label}", results):
            break
        config = agent_config(model, pki.tls_config(), gateway_port=free_port(), model_port=free_port(),
                              model_gateway={"max_tokens": 512, "max_concurrency": 4, "queue_length": 64,
                                             "queue_timeout_s": 300, "request_timeout_s": 600,
                                             "rate_limit": {"requests_per_second": 1000, "burst": 1000},
                                             "allowed_clients": []},
                              model_server={"parallel_slots": 4, "threads": threads, "startup_timeout_s": 600,
                                            "accelerator": "cpu", "gpu_layers": 0, "load_mode": "auto",
                                            "model_name": args.preset},
                              context_window=2048)
        agent_dir = work / f"agent-cpu-{threads}"
        agent_dir.mkdir(parents=True, exist_ok=True)
        (agent_dir / "clawbot.json").write_text(json.dumps(config, indent=2))
        agent = Agent(agent_dir / "clawbot.json", agent_dir / "state", pki).start()
        try:
            status = wait_agent_ready(agent, timeout=300)
            one = run_bench(agent.url, [1, 4], args, pki=pki, requests=4, max_tokens=32, prompt_tokens=64,
                            energy="off")
            results["agent_threads"][label] = {"command_threads": _flag(status["model"]["command"], "-t"),
                                               "plan_reason": status["model"]["plan"]["threads"]["reason"],
                                               **{k: v for k, v in medians([one]).items()}}
        except (RuntimeError, AssertionError, httpx.HTTPError) as exc:
            results["agent_threads"][label] = {"error": str(exc)[-1500:]}
        finally:
            agent.stop()
            (logs / f"agent-cpu-{threads}.log").write_text(agent.log()[-100000:] if agent.log_path.exists() else "")
        say(f"agent {label}: {results['agent_threads'][label]}")
        save()

    # 3. n-gram speculation on the CPU (raw llama-server, every core)
    full = load_config_from(agent_config(model, pki.tls_config(), gateway_port=free_port(), model_port=free_port(),
                                         model_server={"parallel_slots": 1, "threads": cores, "accelerator": "cpu",
                                                       "gpu_layers": 0, "load_mode": "auto", "model_name": args.preset},
                                         context_window=2048), work / "cpu-spec.json")
    _, cpu_cmd, _ = plan_and_command(full, model, server_bin, frozenset({"cpu"}), free_port())
    if budget.allows(80, "speculative decoding on the CPU", results):
        saved = dict(SPEC_VARIANTS)
        SPEC_VARIANTS.clear()
        SPEC_VARIANTS.update({k: saved[k] for k in ("off", "ngram-mod 24/48/64", "ngram-mod 12/4/16")})
        try:
            results["speculative_cpu"] = spec_sweep(args, cpu_cmd, logs, budget, results, draft=None, draft_ngl="0",
                                                    save=save, requests=2, max_tokens=48, prompt_tokens=64)
        finally:
            SPEC_VARIANTS.clear()
            SPEC_VARIANTS.update(saved)

    # 4. llama_cpp.server: the crash of issue 16, then 4 streams against llama-server on these cores
    if budget.allows(60, "llama_cpp.server", results):
        results["llama_cpp_server"] = llama_cpp_server(args, model, work, logs, budget, results, save, cores, cpu_cmd)


def load_config_from(config: dict, path: Path) -> dict:
    path.write_text(json.dumps(config))
    return load_config(str(path))


def llama_cpp_server(args, model: Path, work: Path, logs: Path, budget: Budget, results: dict, save, cores: int,
                     cpu_cmd: list[str]) -> dict:
    from clawbot.model.engines import llama_cpp_python

    site = work / "llcp-site"
    out: dict = {"site": str(site), "importable": (site / "llama_cpp" / "__init__.py").exists()}
    if not out["importable"]:
        out["error"] = "llama-cpp-python was not built (see llama-cpp-python-build.log)"
        return out
    env = {**os.environ, "PYTHONPATH": f"{site}:{os.environ.get('PYTHONPATH', '')}", "PYTHONFAULTHANDLER": "1"}
    full = load_config_from(agent_config(model, make_pki(work / "pki-llcp").tls_config(), gateway_port=free_port(),
                                         model_port=free_port(),
                                         model_server={"engine": "llama-cpp-python", "threads": cores - 1,
                                                       "accelerator": "cpu", "gpu_layers": 0, "load_mode": "auto",
                                                       "model_name": args.preset, "parallel_slots": 0},
                                         context_window=2048), work / "llcp.json")
    facts = preflight.host_facts(preflight.read_node(str(model)), engine_builds=None)
    plan = RunPlan.resolve(full, facts, sizing.read_model_info(model))
    settings_dir = work / "llcp-state"
    settings_dir.mkdir(exist_ok=True)
    port = full["model_server"]["port"]
    settings = llama_cpp_python.settings(plan, full, str(model))
    out["settings"] = settings
    attempts = {"clawbot settings": settings,
                "use_mlock off": {**settings, "models": [{**settings["models"][0], "use_mlock": False}]},
                "1 thread": {**settings, "models": [{**settings["models"][0], "n_threads": 1, "n_threads_batch": 1}]}}
    crashed = None
    out["attempts"] = {}
    for name, body in attempts.items():
        if not budget.allows(30, f"llama_cpp.server {name}", results):
            break
        path = settings_dir / f"{name.replace(' ', '-')}.json"
        path.write_text(json.dumps(body))
        server = RawServer([sys.executable, "-X", "faulthandler", "-m", "llama_cpp.server", "--config_file", str(path)],
                           port, logs / "llama-cpp-server.log", env=env)
        t = time.perf_counter()
        try:
            server.start(timeout=120, health="/v1/models")
            out["attempts"][name] = {"ok": True, "load_s": round(time.perf_counter() - t, 2)}
            if name == "clawbot settings" and budget.allows(45, "llama_cpp.server 4 streams", results):
                out["four_streams"] = medians([run_bench(server.url, [4], args, requests=4, max_tokens=32,
                                                         prompt_tokens=64, energy="off")])["4"]
        except (RuntimeError, AssertionError, httpx.HTTPError) as exc:
            code = server.proc.returncode if server.proc else None
            out["attempts"][name] = {"ok": False, "returncode": code, "tail": str(exc)[-2500:]}
            crashed = crashed or (name, path)
        finally:
            server.stop()
        say(f"llama_cpp.server {name}: {json.dumps(out['attempts'][name])[:400]}")
        save()
        if name == "clawbot settings" and out["attempts"][name].get("ok"):
            break  # no crash to bisect
    if crashed and shutil.which("cuda-gdb") and budget.allows(60, "cuda-gdb backtrace", results):
        name, path = crashed
        proc = subprocess.run(["cuda-gdb", "-batch", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 40",
                               "-ex", "info registers rip", "--args", sys.executable, "-m", "llama_cpp.server",
                               "--config_file", str(path)], capture_output=True, text=True, env=env,
                              timeout=max(30, min(120, budget.left() - 30)))
        (logs / "cuda-gdb.log").write_text(proc.stdout + proc.stderr)
        out["backtrace"] = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                                     if line.startswith(("#", "Thread", "Program", "rip")) or "signal" in line)[-6000:]
    if "four_streams" in out and budget.allows(40, "llama-server 4 streams on the CPU", results):
        port = free_port()
        with RawServer(with_flag(with_flag(server_variant(cpu_cmd, port), "-np", "4"), "-c", "8192"), port,
                       logs / "llama-server-cpu4.log") as server:
            out["llama_server_four_streams"] = medians([run_bench(server.url, [4], args, requests=4, max_tokens=32,
                                                                  prompt_tokens=64, energy="off")])["4"]
        ratio = out["llama_server_four_streams"]["output_tok_s"] / out["four_streams"]["output_tok_s"]
        out["four_stream_ratio_llama_server_vs_llama_cpp_server"] = round(ratio, 2)
    return out


LOAD_SCRIPT = r"""
import sys, llama_cpp
path, mode, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "Llama":  # what llama_cpp.server does with clawbot's settings (mmap + mlock, verbose)
    llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512,
                          n_ubatch=512, n_gpu_layers=0, use_mmap=True, use_mlock=True, verbose=True)
    print("LOADED", llm.n_vocab(), flush=True)
    print("GENERATED", repr(llm("Hello", max_tokens=4)["choices"][0]["text"]), flush=True)
else:  # the bare C API: weight repacking (extra buffer types: AMX, AVX512 repack) on or off
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = mode == "extra-bufts-on"
    model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    print("LOADED" if model else "LOAD RETURNED NULL", flush=True)
"""


def phase_llcp(args, results: dict, save, budget: Budget) -> None:
    """The crash of issue 16: llama-cpp-python built natively from the sdist on this host, loading the same models
    llama-server serves here; each load in its own process (faulthandler on), the first crash under cuda-gdb."""
    work = Path(args.work)
    logs = work / "logs"
    paths, procs = ensure_models(args, work, logs, draft=True)
    llcp = build_llama_cpp_python(Path(args.llama_cpp_python_src), args.source_dir or Path("."), work, logs,
                                  nice=False)
    t = time.perf_counter()
    if llcp is not None:
        llcp.wait()
        results["llama_cpp_python_build"] = {"rc": llcp.returncode, "seconds": round(time.perf_counter() - t, 1)}
    finish_models(paths, procs, logs)
    save()
    site = work / "llcp-site"
    env = {**os.environ, "PYTHONPATH": f"{site}:{os.environ.get('PYTHONPATH', '')}", "CUDA_VISIBLE_DEVICES": ""}
    script = work / "load.py"
    script.write_text(LOAD_SCRIPT)
    cores = preflight.usable_cores() or os.cpu_count() or 1
    runs = [("8B Llama (clawbot settings)", paths["main"], "Llama", cores - 1),
            ("8B C API, extra buffer types on", paths["main"], "extra-bufts-on", cores - 1),
            ("8B C API, extra buffer types off", paths["main"], "extra-bufts-off", cores - 1),
            ("1B Llama", paths["draft"], "Llama", cores - 1),
            ("8B Llama, 1 thread", paths["main"], "Llama", 1)]
    results["loads"] = {}
    crashed = None
    for name, model, mode, threads in runs:
        if not budget.allows(40, name, results):
            break
        cmd = [sys.executable, "-X", "faulthandler", str(script), str(model), mode, str(threads)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=90)
            text, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            text, code = f"{exc.stdout or ''}{exc.stderr or ''}", "timeout"
        (logs / f"load-{len(results['loads'])}.log").write_text(text if isinstance(text, str) else str(text))
        lines = [line for line in str(text).splitlines() if not line.startswith(("llama_model_loader: - kv",
                                                                                    "llama_graph_n_input"))]
        results["loads"][name] = {"returncode": code, "loaded": "LOADED" in str(text),
                                  "tail": "\n".join(lines[-45:])}
        say(f"{name}: rc {code}, loaded {'LOADED' in str(text)}")
        if code not in (0, "timeout") and crashed is None:
            crashed = cmd
        save()
    if crashed and shutil.which("cuda-gdb") and budget.allows(50, "cuda-gdb", results):
        try:
            proc = subprocess.run(["cuda-gdb", "-batch", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 30",
                                   "-ex", "info registers rip", "-ex", "x/3i $pc", "--args", *crashed[:1],
                                   *crashed[3:]], capture_output=True, text=True, env=env,
                                  timeout=max(30, min(150, budget.left() - 10)))
            text = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            text = f"timeout\n{exc.stdout or ''}{exc.stderr or ''}"
        (logs / "cuda-gdb.log").write_text(str(text))
        keep = [line for line in str(text).splitlines()
                if line.startswith(("#", "Thread", "Program", "rip", "=>", "   0x")) or "signal" in line.lower()]
        results["backtrace"] = "\n".join(keep)[-8000:]
        save()


def phase_llcp2(args, results: dict, save, budget: Budget) -> None:
    """The fix for the crash phase llcp found: the same build with every static archive's symbols kept private to each
    shared library (-Wl,--exclude-libs,ALL), then llama_cpp.server against llama-server at 4 streams on the CPU."""
    work = Path(args.work)
    logs = work / "logs"
    paths, procs = ensure_models(args, work, logs, draft=False)
    t = time.perf_counter()
    name = "llcp-site-plain" if args.llcp_plain else "llcp-site-private"
    llcp = None if not args.llama_cpp_python_src else build_llama_cpp_python(
                                  Path(args.llama_cpp_python_src), args.source_dir or Path("."), work, logs,
                                  nice=False, site_name=name,
                                  extra_cmake="-DLLAVA_BUILD=OFF" + ("" if args.llcp_plain else
                                                                     " -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL"))
    facts = {}
    for name, cmd in (("g++ -v", "/opt/gcc/bin/g++ -v 2>&1 | tail -3; which -a g++ c++"),
                      ("libstdc++ in the process", "ldconfig -p | grep libstdc++"),
                      ("old build: libstdc++ symbols exported by libggml.so.0",
                       f"nm -D --defined-only {work}/llcp-site/llama_cpp/lib/libggml.so.0 2>&1 | grep -c _ZNSo9_M_insert ;"
                       f" ldd {work}/llcp-site/llama_cpp/lib/libggml.so.0 2>&1 | head")):
        facts[name] = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=30).stdout[-1500:]
    results["toolchain"] = facts
    save()
    if llcp is not None:
        llcp.wait()
        results["llama_cpp_python_build"] = {"rc": llcp.returncode, "seconds": round(time.perf_counter() - t, 1)}
    finish_models(paths, procs, logs)
    site = work / name
    results["toolchain"]["this build: libstdc++ code in the libraries"] = subprocess.run(
        ["bash", "-c", f"cd {site}/llama_cpp/lib && for f in lib*.so*; do [ -L $f ] && continue; echo \"$f: "
                       f"exported _M_insert $(nm -D --defined-only $f | grep -c _ZNSo9_M_insert), all _M_insert "
                       f"$(nm $f 2>/dev/null | grep -c _ZNSo9_M_insert; objdump -t $f | grep -c _ZNSo9_M_insert), "
                       f"NEEDED $(readelf -d $f | grep -o 'lib[a-z+]*\\.so[.0-9]*' | tr '\\n' ' ')\"; done"],
        capture_output=True, text=True, timeout=60).stdout[-3000:]
    save()
    env = {**os.environ, "PYTHONPATH": f"{site}:{os.environ.get('PYTHONPATH', '')}", "CUDA_VISIBLE_DEVICES": ""}
    script = work / "load.py"
    script.write_text(LOAD_SCRIPT)
    cores = preflight.usable_cores() or os.cpu_count() or 1
    proc = subprocess.run([sys.executable, "-X", "faulthandler", str(script), str(paths["main"]), "Llama",
                           str(cores - 1)], capture_output=True, text=True, env=env, timeout=120)
    text = proc.stdout + proc.stderr
    (logs / "load-private.log").write_text(text)
    results["load_with_private_symbols"] = {"returncode": proc.returncode, "loaded": "LOADED" in text,
                                            "tail": "\n".join(text.splitlines()[-12:])}
    say(f"load with private symbols: rc {proc.returncode}")
    save()
    if proc.returncode != 0 or args.llcp_plain or not budget.allows(60, "4 streams", results):
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    model = paths["main"]
    full = load_config_from(agent_config(model, make_pki(work / "pki-llcp2").tls_config(), gateway_port=free_port(),
                                         model_port=free_port(),
                                         model_server={"engine": "llama-cpp-python", "threads": cores - 1,
                                                       "accelerator": "cpu", "gpu_layers": 0, "load_mode": "auto",
                                                       "model_name": args.preset, "parallel_slots": 0},
                                         context_window=2048), work / "llcp2.json")
    from clawbot.model.engines import llama_cpp_python

    plan = RunPlan.resolve(full, preflight.host_facts(preflight.read_node(str(model)), engine_builds=None),
                           sizing.read_model_info(model))
    settings = llama_cpp_python.settings(plan, full, str(model))
    path = work / "llcp2-settings.json"
    path.write_text(json.dumps(settings))
    port = full["model_server"]["port"]
    out: dict = {"settings_threads": settings["models"][0]["n_threads"]}
    server = RawServer([sys.executable, "-m", "llama_cpp.server", "--config_file", str(path)], port,
                       logs / "llama-cpp-server-private.log", env=env)
    try:
        out["load_s"] = round(server.start(timeout=180, health="/v1/models"), 2)
        out["llama_cpp_server"] = medians([run_bench(server.url, [1, 4], args, requests=4, max_tokens=32,
                                                     prompt_tokens=64, energy="off")])
    finally:
        server.stop()
    results["four_streams"] = out
    save()
    cuda_bin = engine.find_llama_server("cuda")
    if cuda_bin is None or not budget.allows(40, "llama-server 4 streams", results):
        return
    srv_config = load_config_from(agent_config(model, {}, gateway_port=free_port(), model_port=free_port(),
                                               model_server={"parallel_slots": 4, "threads": cores - 1,
                                                             "accelerator": "cpu", "gpu_layers": 0, "load_mode": "auto",
                                                             "model_name": args.preset},
                                               context_window=2048), work / "srv4.json")
    _, cmd, _ = plan_and_command(srv_config, model, cuda_bin, frozenset({"cpu"}), free_port())
    port = free_port()
    with RawServer(server_variant(cmd, port), port, logs / "llama-server-cpu4.log") as raw:
        out["llama_server"] = medians([run_bench(raw.url, [1, 4], args, requests=4, max_tokens=32, prompt_tokens=64,
                                                 energy="off")])
    a, b = out["llama_server"]["4"]["output_tok_s"], out["llama_cpp_server"]["4"]["output_tok_s"]
    out["ratio_4_streams"] = round(a / b, 2) if a and b else None
    results["four_streams"] = out
    save()


# --------------------------------------------------------------------------- phase spec (any model, e.g. on this CPU)


def phase_spec(args, results: dict, save, budget: Budget) -> None:
    work = Path(args.work)
    logs = work / "logs"
    model = Path(args.model)
    server_bin = Path(args.engine_binary) if args.engine_binary else (
        engine.find_llama_server(args.accelerator) or engine.build_engine(args.accelerator, source_dir=args.source_dir))
    cores = preflight.usable_cores() or 1
    full = load_config_from(agent_config(model, {}, gateway_port=free_port(), model_port=free_port(),
                                         model_server={"parallel_slots": 1, "threads": args.threads or cores,
                                                       "accelerator": args.accelerator, "gpu_layers": 0,
                                                       "load_mode": "mmap", "model_name": "spec",
                                                       "chat_template": args.chat_template},
                                         context_window=4096), work / "spec.json")
    _, cmd, _ = plan_and_command(full, model, server_bin, frozenset({args.accelerator}), free_port())
    results["model"] = {"path": str(model), "gib": round(model.stat().st_size / 2**30, 3)}
    results["command"] = cmd[1:]
    prompts = {"rewrite code (repeats the prompt)": [f"Rewrite the following code with type hints, keeping "
                                                     f"everything else the same:\n\n{code}\nThe rewritten code:\n"
                                                     for code in CODE_SNIPPETS],
               "free text": FREE_PROMPTS}
    results["speculative"] = spec_sweep(args, cmd, logs, budget, results, draft=None, draft_ngl="0", save=save,
                                        requests=args.requests, max_tokens=args.max_tokens, prompts=prompts)


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["gpu", "cpu", "spec", "llcp", "llcp2"], default="gpu")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu.json"))
    parser.add_argument("--work", default="/tmp/clawbot-gpu-bench", help="model, PKI, logs (never in the repo)")
    parser.add_argument("--source-dir", type=Path, default=None, help="llama.cpp sources (default: the sdist)")
    parser.add_argument("--llama-cpp-python-src", default="", help="tarball of the sdist's Python part (phase cpu)")
    parser.add_argument("--accelerator", default="cuda", choices=engine.ACCELERATORS)
    parser.add_argument("--engine-binary", default="", help="use this llama-server (llama-bench beside it) instead "
                        "of building one (a smoke test on a machine that has a build)")
    parser.add_argument("--preset", default="llama-3-8b")
    parser.add_argument("--draft-preset", default="llama-3.2-1b")
    parser.add_argument("--quant", default="Q4_0")
    parser.add_argument("--model", default="", help="phase spec: the GGUF to measure")
    parser.add_argument("--llcp-plain", action="store_true", help="phase llcp2: build without -Wl,--exclude-libs,ALL")
    parser.add_argument("--chat-template", default="", help="phase spec: model_server.chat_template")
    parser.add_argument("--threads", type=int, default=0, help="phase spec: -t (0: every core)")
    parser.add_argument("--requests", type=int, default=8, help="requests per concurrency level and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, default=4, help="model_gateway.max_concurrency; parallel_slots is auto")
    parser.add_argument("--context", type=int, default=4096, help="context per slot")
    parser.add_argument("--budget-s", type=float, default=540, help="stop starting new steps after this")
    args = parser.parse_args()

    budget = Budget(args.budget_s)
    work = Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"phase": args.phase, "gpu": gpu_facts(), "cpu": cpu_facts(),
                     "machine": {"platform": platform.platform(), "python": platform.python_version()},
                     "settings": {"requests_per_level_and_round": args.requests, "rounds": args.rounds,
                                  "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                                  "max_concurrency": args.slots, "parallel_slots": "auto",
                                  "context_per_slot": args.context, "ignore_eos": True}}

    def save() -> None:
        results["total_seconds"] = round(time.perf_counter() - started, 1)
        out.write_text(json.dumps(results, indent=2) + "\n")

    say(f"phase {args.phase}; GPU: {results['gpu'] or 'none'}; CPU: {results['cpu']}")
    try:
        {"gpu": phase_gpu, "cpu": phase_cpu, "spec": phase_spec, "llcp": phase_llcp, "llcp2": phase_llcp2}[args.phase](
            args, results, save, budget)
    except Exception as exc:  # keep what was measured
        import traceback
        results["error"] = traceback.format_exc()[-4000:]
        say(f"ERROR: {exc}")
    save()
    md = markdown(results)
    out.with_suffix(".md").write_text(md)
    print(md, flush=True)
    return 0 if "error" not in results else 1


def wait_agent_ready(agent: Agent, timeout: float) -> dict:
    """Agent.wait_ready, but an agent that exits (a missing dependency, a bad config) fails at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.proc.poll() is not None:
            raise RuntimeError(f"agent exited with {agent.proc.returncode}:\n{agent.log()[-3000:]}")
        try:
            if agent.get("/readyz").status_code == 200:
                return agent.status()
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"agent not ready after {timeout:g} s:\n{agent.log()[-3000:]}")


def _flag(cmd: list[str] | None, name: str) -> str:
    return cmd[cmd.index(name) + 1] if cmd and name in cmd else "?"


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, (int, float)) else str(value))


def markdown(r: dict) -> str:
    lines = [f"### {r['phase']} phase: GPU {r['gpu'].get('name', 'none')}, CPU {r['cpu'].get('model', '?')} "
             f"({r['cpu'].get('usable_cores')} cores), model {r.get('model', {}).get('preset', r.get('model', {}).get('path', '?'))} "
             f"{r.get('model', {}).get('quant', '')} ({r.get('model', {}).get('gib', '?')} GiB)", ""]
    rows = {row["test"] + f"/t{row['threads']}": row for row in r.get("llama_bench", [])}
    if rows:
        lines += ["| llama-bench | threads | tok/s | ms/token |", "| --- | --- | --- | --- |"]
        lines += [f"| {row['test']} | {row['threads']} | {row['avg_tok_s']} ± {row['stddev_tok_s']} | "
                  f"{row['ms_per_token']} |" for row in rows.values()]
        lines.append("")
    if r.get("gateway"):
        raw, gw = r["raw_llama_server"], r["gateway"]
        depth = r["settings"]["prompt_tokens"]
        ceiling = next((row for row in r.get("llama_bench", []) if row["test"] == f"tg{r['settings']['max_tokens']}@d{depth}"
                        and str(row["threads"]) != "1"), None)
        lines += ["| measure | raw llama-server | clawbot agent + mTLS gateway | clawbot / raw |",
                  "| --- | --- | --- | --- |"]
        for key, label in (("tpot_p50_ms", "time per output token after the first, p50 (ms), 1 stream"),
                           ("itl_p50_ms", "inter-token p50 (ms), 1 stream"),
                           ("decode_tok_s_per_stream", "decode tok/s (1 / TPOT), 1 stream"),
                           ("server_decode_tok_s", "llama-server's own decode tok/s (timings), 1 stream"),
                           ("output_tok_s", "output tok/s incl. the first token, 1 stream"),
                           ("ttft_p50_ms", f"first token p50 (ms), {depth}-token prompt")):
            a, b = raw["1"].get(key), gw["1"].get(key)
            lines.append(f"| {label} | {_fmt(a)} | {_fmt(b)} | {_fmt(b / a if a and b else None, 3)} |")
        a, b = raw["4"]["output_tok_s"], gw["4"]["output_tok_s"]
        lines.append(f"| output tok/s, 4 streams | {_fmt(a)} | {_fmt(b)} | {_fmt(b / a if a and b else None, 3)} |")
        for c in ("1", "4"):
            lines.append(f"| energy, {c} stream(s): J per output token (above idle) / J per request | "
                         f"{_fmt(raw[c]['joules_per_output_token'], 3)} ({_fmt(raw[c]['joules_per_output_token_above_idle'], 3)}) / "
                         f"{_fmt(raw[c]['joules_per_request'])} | "
                         f"{_fmt(gw[c]['joules_per_output_token'], 3)} ({_fmt(gw[c]['joules_per_output_token_above_idle'], 3)}) / "
                         f"{_fmt(gw[c]['joules_per_request'])} | mean {_fmt(gw[c]['mean_power_w'], 1)} W, "
                         f"{gw[c]['power_samples']} samples every {_fmt(gw[c]['sample_interval_s'], 3)} s |")
        if ceiling:
            per = gw["1"]["tpot_p50_ms"]
            lines += ["", f"Per token at depth {depth}: llama-bench {ceiling['ms_per_token']} ms, raw llama-server "
                          f"{raw['1']['tpot_p50_ms']} ms, full stack {per} ms: "
                          f"{_fmt(per / ceiling['ms_per_token'] if per else None, 3)}x the engine's ceiling "
                          f"(goal <= {TARGET_PER_TOKEN_RATIO})."]
        lines.append("")
    if r.get("gap_variants"):
        lines += ["| raw llama-server variant | TPOT p50 ms (sampled) | server decode tok/s | TPOT p50 ms (greedy) | "
                  "first token ms |", "| --- | --- | --- | --- | --- |"]
        for name, v in r["gap_variants"].items():
            if "error" in v:
                lines.append(f"| {name} | error: {v['error'][:120]} | | | |")
                continue
            lines.append(f"| {name} | {_fmt(v['sampled']['tpot_p50_ms'], 3)} | {_fmt(v['sampled']['server_decode_tok_s'])} | "
                         f"{_fmt(v['greedy']['tpot_p50_ms'], 3)} | {_fmt(v['sampled']['ttft_p50_ms'])} |")
        lines.append("")
    for key in ("speculative_gpu", "speculative_cpu", "speculative"):
        spec = r.get(key)
        if not spec:
            continue
        lines += [f"{key}:", "", "| variant | prompt | decode tok/s (1 / TPOT) | server tok/s | acceptance | "
                  "greedy output as with off |", "| --- | --- | --- | --- | --- | --- |"]
        for name, entry in spec.items():
            if "error" in entry:
                lines.append(f"| {name} | error: {entry['error'][:150]} | | | | |")
                continue
            for label, v in entry.items():
                if not isinstance(v, dict) or "decode_tok_s_per_stream" not in v:
                    continue
                acc = (v.get("speculative") or {}).get("acceptance_rate")
                if name == "off":
                    same = "reference"
                elif entry.get("greedy_same_as_off"):
                    same = "yes"
                else:
                    same = f"no (from character {entry.get('greedy_first_difference_at_char')})"
                lines.append(f"| {name} | {label} | {_fmt(v['decode_tok_s_per_stream'])} | "
                             f"{_fmt(v.get('server_decode_tok_s'))} | {_fmt(acc, 3)} | {same} |")
        lines.append("")
    if r.get("thread_sweep"):
        lines += ["| CPU threads | test | tok/s |", "| --- | --- | --- |"]
        lines += [f"| {row['threads']} | {row['test']} | {row['avg_tok_s']} ± {row['stddev_tok_s']} |"
                  for row in r["thread_sweep"]]
        lines.append("")
    if r.get("agent_threads"):
        lines += ["| full stack, CPU | -t | decode tok/s 1 stream | output tok/s 4 streams | first token ms |",
                  "| --- | --- | --- | --- | --- |"]
        for label, v in r["agent_threads"].items():
            if "error" in v:
                lines.append(f"| {label} | error | | | |")
                continue
            lines.append(f"| {label} | {v['command_threads']} | {_fmt(v['1']['decode_tok_s_per_stream'])} | "
                         f"{_fmt(v['4']['output_tok_s'])} | {_fmt(v['1']['ttft_p50_ms'])} |")
        lines.append("")
    if r.get("llama_cpp_server"):
        lines += ["llama_cpp.server: " + json.dumps({k: v for k, v in r["llama_cpp_server"].items()
                                                     if k not in ("settings",)})[:3000], ""]
    if r.get("loads"):
        lines += ["| llama-cpp-python load | exit | loaded |", "| --- | --- | --- |"]
        lines += [f"| {name} | {v['returncode']} | {v['loaded']} |" for name, v in r["loads"].items()]
        lines.append("")
    if r.get("backtrace"):
        lines += ["```", r["backtrace"][-3000:], "```", ""]
    if r.get("skipped"):
        lines += ["Skipped: " + "; ".join(r["skipped"]), ""]
    if r.get("error"):
        lines += ["Error: " + r["error"][-1500:], ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
