"""GPU model-node benchmark: raw llama.cpp vs the full clawbot stack on one GPU, same model, same run.

    bash benchmarks/bench_gpu.sh            # on the GPU machine: offline setup, then this script
    python benchmarks/bench_gpu.py --source-dir DIR [--out benchmarks/results/gpu.json]

Steps, all on the machine with the GPU:
1. build the engine for the accelerator (`clawbot build-engine`: llama-server + llama-bench, CMAKE_CUDA_ARCHITECTURES
   from nvidia-smi's compute capability) while the model is generated next to it (clawbot.tools.modelgen:
   Llama-3-8B shapes, Q4_0, random weights: speed does not depend on the weights' values);
2. raw llama-bench (pp512 / tg128, all layers on the GPU, flash attention on);
3. raw llama-server with the very command line the clawbot supervisor builds (no API key, no gateway),
   and the same with a variant flag (default `-ub 512`, the micro-batch clawbot used before `ubatch_size`
   auto picked 1024 on GPUs; `--variant cram` measures llama-server's default prompt cache instead);
4. the clawbot agent (`accelerator: auto`, `gpu_layers: -1`, `flash_attention: auto`: the GPU-aware defaults)
   behind its mTLS gateway; `clawbot bench` against raw and gateway in alternating rounds
   (1 and 4 streams, a 512-token prompt, 128 output tokens, ignore_eos); medians over rounds.
Writes the results JSON (naming the GPU) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
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

# Targets of issue 9 (full stack vs raw llama-server, and first token through the gateway).
TARGET_RATIO = 0.95
TARGET_TTFT_MS = 60.0
# Published reference points for this model class on an H100 (llama.cpp's own CUDA numbers for
# Llama-3-8B Q4_0, as quoted in the article the README compares against): tg128 / pp512 tok/s.
# They are context for the table only; nothing here is compared against them automatically.


def gpu_facts() -> dict:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,compute_cap",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    first = [p.strip() for p in out.strip().splitlines()[0].split(",")]
    return {"name": first[0], "driver": first[1], "memory_total_mib": int(float(first[2])),
            "memory_used_mib": int(float(first[3])), "compute_cap": first[4], "count": len(out.strip().splitlines())}


def run_llama_bench(binary: Path, model: Path, ngl: str, log_dir: Path) -> list[dict]:
    cmd = [str(binary), "-m", str(model), "-ngl", "99" if ngl == "all" else ngl, "-fa", "1",
           "-p", "512", "-n", "128", "-r", "3", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    (log_dir / "llama-bench.log").write_text(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rows = json.loads(proc.stdout)
    return [{"test": f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}", "n_prompt": r["n_prompt"],
             "n_gen": r["n_gen"], "avg_tok_s": round(r["avg_ts"], 2), "stddev_tok_s": round(r["stddev_ts"], 2),
             "n_gpu_layers": r.get("n_gpu_layers"), "flash_attn": r.get("flash_attn"),
             "backends": r.get("backends"), "gpu_info": r.get("gpu_info"), "build": r.get("build_commit")}
            for r in rows]


class RawServer:
    """llama-server started directly (own process group), no agent, no gateway, no API key."""

    def __init__(self, cmd: list[str], port: int, log_path: Path):
        self.cmd, self.port, self.log_path = cmd, port, log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600) -> float:
        began = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

        def healthy():
            if self.proc.poll() is not None:
                raise AssertionError(f"llama-server exited: {self.log_path.read_text(errors='replace')[-3000:]}")
            return httpx.get(self.url + "/health", timeout=5).status_code == 200
        wait_for(healthy, timeout, 0.2, "raw llama-server /health")
        return time.perf_counter() - began

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def run_bench(url: str, levels: list[int], args, pki=None, api_key: str | None = None) -> dict:
    tls = dict(cacert=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key)) if pki else {}
    return asyncio.run(bench.bench(url, concurrency=levels, requests=args.requests, prompt_tokens=args.prompt_tokens,
                                   max_tokens=args.max_tokens, ignore_eos=True, api_key=api_key, **tls))


def level(report: dict, concurrency: int) -> dict:
    return next(lv for lv in report["levels"] if lv["concurrency"] == concurrency)


def medians(reports: list[dict]) -> dict:
    out = {}
    for lv in reports[0]["levels"]:
        c = lv["concurrency"]
        same = [level(r, c) for r in reports]
        out[str(c)] = {
            "rounds": len(same),
            "output_tok_s": round(statistics.median(x["output_throughput_tok_s"] for x in same), 2),
            "ttft_p50_ms": round(statistics.median(x["ttft_ms"]["p50"] for x in same), 2),
            "itl_p50_ms": round(statistics.median(x["itl_ms"]["p50"] for x in same), 2),
            "failed": sum(x["failed"] for x in same),
        }
    return out


def generate_model(path: Path, preset: str, quant: str, log_dir: Path) -> subprocess.Popen:
    log = open(log_dir / "make-model.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "clawbot", "make-model", "--preset", preset, "--quant", quant,
                             str(path)], stdout=log, stderr=subprocess.STDOUT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu.json"))
    parser.add_argument("--work", default="/tmp/clawbot-gpu-bench", help="model, PKI, logs (never in the repo)")
    parser.add_argument("--source-dir", type=Path, default=None, help="llama.cpp sources (default: the sdist)")
    parser.add_argument("--accelerator", default="cuda", choices=engine.ACCELERATORS)
    parser.add_argument("--preset", default="llama-3-8b")
    parser.add_argument("--quant", default="Q4_0")
    parser.add_argument("--requests", type=int, default=8, help="requests per concurrency level and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, default=4, help="model_gateway.max_concurrency; parallel_slots is auto")
    parser.add_argument("--variant", choices=["ub512", "cram"], default="ub512",
                        help="raw llama-server variant measured against clawbot's command line (1 stream)")
    parser.add_argument("--context", type=int, default=4096, help="context per slot")
    args = parser.parse_args()

    work = Path(args.work)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {"gpu": gpu_facts(), "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                      "python": platform.python_version()},
                     "settings": {"requests_per_level_and_round": args.requests, "rounds": args.rounds,
                                  "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                                  "max_concurrency": args.slots, "parallel_slots": "auto", "context_per_slot": args.context,
                                  "ignore_eos": True}}
    print(f"[bench-gpu] GPU: {results['gpu'] or 'none'}", flush=True)

    model = work / f"{args.preset}-{args.quant}.gguf"
    gen = None
    if not model.exists():
        gen_started = time.perf_counter()
        gen = generate_model(model.with_suffix(".tmp"), args.preset, args.quant, logs)

    t = time.perf_counter()
    server_bin = engine.build_engine(args.accelerator, source_dir=args.source_dir, with_bench=True)
    info_path = server_bin.parent.parent / "build-info.json"
    results["engine"] = {"binary": str(server_bin), "seconds_this_run": round(time.perf_counter() - t, 1),
                         "build_info": json.loads(info_path.read_text()) if info_path.exists() else None,
                         "version": engine.engine_version(server_bin)}
    print(f"[bench-gpu] engine ready: {results['engine']}", flush=True)
    if gen is not None:
        if gen.wait() != 0:
            raise RuntimeError("make-model failed: " + (logs / "make-model.log").read_text()[-2000:])
        model.with_suffix(".tmp").rename(model)
        results["model_generation_s"] = round(time.perf_counter() - gen_started, 1)
    results["model"] = {"preset": args.preset, "quant": args.quant, "bytes": model.stat().st_size,
                        "gib": round(model.stat().st_size / 2**30, 2)}
    print(f"[bench-gpu] model: {results['model']}", flush=True)

    pki = make_pki(work / "pki")
    config = agent_config(model, pki.tls_config(), gateway_port=free_port(), model_port=free_port(),
                          model_gateway={"max_tokens": min(1024, args.context // 4), "max_concurrency": args.slots, "queue_length": 64,
                                         "queue_timeout_s": 300, "request_timeout_s": 600,
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
    raw_config = {**full, "model_server": {**full["model_server"], "port": raw_port}}
    # What the supervisor decides on this node: the same run plan, from the same facts.
    facts = preflight.host_facts(preflight.read_node(str(model)), engine_builds=frozenset({args.accelerator}))
    plan = RunPlan.resolve(raw_config, facts, sizing.read_model_info(model))
    results["run_plan"] = plan.to_json()
    results["slot_plan"] = {"slots": plan.slots.value, "reason": plan.slots.reason}
    raw_cmd = llama_server.command(plan, raw_config, Paths(model=str(model), binary=str(server_bin)))
    results["raw_llama_server_command"] = raw_cmd[1:]
    ngl = raw_cmd[raw_cmd.index("-ngl") + 1]

    bench_bin = server_bin.parent / engine.BENCH_TARGET
    results["llama_bench"] = run_llama_bench(bench_bin, model, ngl, logs)
    print(f"[bench-gpu] llama-bench: {results['llama_bench']}", flush=True)

    # one flag measured against the supervisor's choice, 1 stream: -ub 512 (or the default prompt cache)
    if args.variant == "cram":
        i = raw_cmd.index("-cram")
        variant_cmd = raw_cmd[:i] + raw_cmd[i + 2:]
    else:
        variant_cmd = list(raw_cmd)
        variant_cmd[variant_cmd.index("-ub") + 1] = "512"
    variant_port = free_port()
    variant_cmd[variant_cmd.index("--port") + 1] = str(variant_port)
    variant = RawServer(variant_cmd, variant_port, logs / f"llama-server-{args.variant}.log")
    variant.start()
    try:
        variant_reports = [run_bench(variant.url, [1], args) for _ in range(2)]
    finally:
        variant.stop()

    raw = RawServer(raw_cmd, raw_port, logs / "llama-server-raw.log")
    results["raw_load_s"] = round(raw.start(), 2)
    agent = Agent(agent_dir / "clawbot.json", agent_dir / "state", pki).start()
    try:
        t = time.perf_counter()
        status = wait_agent_ready(agent, timeout=600)
        results["agent_start_to_ready_s"] = round(time.perf_counter() - t, 2)
        results["agent_model_server_command"] = status.get("model", {}).get("command") or _command_from_log(agent)
        rounds: dict[str, list] = {"raw": [], "gateway": [], f"raw_{args.variant}": variant_reports}
        for n in range(args.rounds):
            rounds["raw"].append(run_bench(raw.url, [1, 4], args))
            rounds["gateway"].append(run_bench(agent.url, [1, 4], args, pki=pki))
            print(f"[bench-gpu] round {n + 1}: raw {medians(rounds['raw'])} gateway {medians(rounds['gateway'])}",
                  flush=True)
        results["rounds"] = rounds
    finally:
        agent.stop()
        raw.stop()
        (logs / "agent.log").write_text(agent.log()[-200000:] if agent.log_path.exists() else "")

    raw_m, gw_m, var_m = medians(rounds["raw"]), medians(rounds["gateway"]), medians(variant_reports)
    results["raw_llama_server"], results["gateway"], results[f"raw_llama_server_{args.variant}"] = raw_m, gw_m, var_m
    r1 = gw_m["1"]["output_tok_s"] / raw_m["1"]["output_tok_s"]
    r4 = gw_m["4"]["output_tok_s"] / raw_m["4"]["output_tok_s"]
    results["acceptance"] = {
        "decode_1_stream_ratio": {"value": round(r1, 3), "target": f">= {TARGET_RATIO}", "met": r1 >= TARGET_RATIO},
        "aggregate_4_streams_ratio": {"value": round(r4, 3), "target": f">= {TARGET_RATIO}", "met": r4 >= TARGET_RATIO},
        "ttft_p50_ms_512_prompt_gateway": {"value": gw_m["1"]["ttft_p50_ms"], "target": f"<= {TARGET_TTFT_MS}",
                                           "met": gw_m["1"]["ttft_p50_ms"] <= TARGET_TTFT_MS},
    }
    results["variant"] = {"name": args.variant, "ttft_p50_ms_clawbot": raw_m["1"]["ttft_p50_ms"],
                          "ttft_p50_ms_variant": var_m["1"]["ttft_p50_ms"],
                          "output_tok_s_variant": var_m["1"]["output_tok_s"]}
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results)
    out.with_suffix(".md").write_text(md)
    print(md, flush=True)
    return 0


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


def _command_from_log(agent: Agent) -> str | None:
    for line in agent.log().splitlines():
        if "llama-server" in line and "-ngl" in line:
            return line.strip()
    return None


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1] if name in cmd else "?"


def markdown(r: dict) -> str:
    g, raw, a = r["gateway"], r["raw_llama_server"], r["acceptance"]
    bench_rows = {row["test"]: row for row in r["llama_bench"]}
    gpu = r["gpu"].get("name", "no GPU")
    lines = [
        f"### GPU benchmark: {gpu}, {r['model']['preset']} {r['model']['quant']} ({r['model']['gib']} GiB, "
        f"random weights), {r['settings']['prompt_tokens']}-token prompt, {r['settings']['max_tokens']} output tokens",
        "",
        "| measure | llama-bench (raw) | llama-server (raw) | clawbot agent + mTLS gateway | ratio / target |",
        "| --- | --- | --- | --- | --- |",
        f"| decode tok/s, 1 stream | {bench_rows.get('tg128', {}).get('avg_tok_s', '-')} (tg128) | "
        f"{raw['1']['output_tok_s']} | {g['1']['output_tok_s']} | {a['decode_1_stream_ratio']['value']} "
        f"(≥ {TARGET_RATIO}: {'met' if a['decode_1_stream_ratio']['met'] else 'MISSED'}) |",
        f"| output tok/s, 4 streams | - | {raw['4']['output_tok_s']} | {g['4']['output_tok_s']} | "
        f"{a['aggregate_4_streams_ratio']['value']} (≥ {TARGET_RATIO}: "
        f"{'met' if a['aggregate_4_streams_ratio']['met'] else 'MISSED'}) |",
        f"| first token p50, 512-token prompt | {bench_rows.get('pp512', {}).get('avg_tok_s', '-')} tok/s (pp512) | "
        f"{raw['1']['ttft_p50_ms']} ms | {g['1']['ttft_p50_ms']} ms | ≤ {TARGET_TTFT_MS:g} ms: "
        f"{'met' if a['ttft_p50_ms_512_prompt_gateway']['met'] else 'MISSED'} |",
        f"| inter-token p50, 1 stream | - | {raw['1']['itl_p50_ms']} ms | {g['1']['itl_p50_ms']} ms | |",
        "",
        (f"Micro-batch: first token p50 {r['variant']['ttft_p50_ms_clawbot']} ms with clawbot's `-ub "
         f"{_flag(r['raw_llama_server_command'], '-ub')}` vs {r['variant']['ttft_p50_ms_variant']} ms with `-ub 512` (raw llama-server)."
         if r["variant"]["name"] == "ub512" else
         f"Prompt cache: first token p50 {r['variant']['ttft_p50_ms_clawbot']} ms with `--cache-ram 0` (clawbot's "
         f"setting) vs {r['variant']['ttft_p50_ms_variant']} ms with llama-server's default."),
        f"Parallel slots (auto): {r['slot_plan']['slots']} — {r['slot_plan']['reason']}.",
        f"Engine: {r['engine']['build_info']['accelerator'] if r['engine'].get('build_info') else '?'} build, "
        f"compiled in {(r['engine'].get('build_info') or {}).get('compile_seconds', '?')} s; "
        f"agent start → ready {r.get('agent_start_to_ready_s')} s. Medians of {r['settings']['rounds']} alternating "
        f"rounds of {r['settings']['requests_per_level_and_round']} requests per level.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
