"""Gateway benchmark: what the mTLS gateway costs, what the engines give, and how long a start takes.

    python benchmarks/bench_gateway.py [--out benchmarks/results/gateway.json] [--requests 8]

On one generated ~120 MB Q8_0 model (clawbot.tools.modelgen preset test-100m, random weights: speed does not
depend on the values):
1. gateway vs direct llama-server, 1 stream: first-token p50 and output tokens/s ratios;
2. aggregate output tokens/s at 4 concurrent streams: gateway+llama-server, raw llama-server,
   gateway+llama_cpp.server (one request at a time by design);
3. agent start -> ready against model size, with the file's cold read speed measured by the same
   process (the file is evicted from the page cache with posix_fadvise first, only that file).
Results go to benchmarks/results/*.json and a Markdown summary (for the README) is printed and saved.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from clawbot.tools import bench  # noqa: E402
from clawbot.model.engines.build import build_engine, find_llama_server  # noqa: E402
from tests.fixtures_agent import Agent, agent_config, free_port, make_pki, wait_for  # noqa: E402
from tests.fixtures_models import write_model_file  # noqa: E402

# One compute thread on this 2-core machine: llama.cpp's threads spin at barriers, and with -t 2 every
# wake-up of the gateway or the client (sharing those 2 cores) stalls a whole token (measured: 2 threads
# gave 11-20 tok/s under load, 1 thread 108-123 tok/s). A model node that runs the gateway too should
# leave it a core.
THREADS = int(os.environ.get("CLAWBOT_BENCH_THREADS", 1))
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clawbot" / "bench"


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cold_read_mb_s(path: Path) -> float:
    evict(path)
    start = time.perf_counter()
    with open(path, "rb") as handle:
        while handle.read(16 << 20):
            pass
    return path.stat().st_size / (1 << 20) / (time.perf_counter() - start)


def start(tmp: Path, pki, model: Path, engine: str, slots: int = 4) -> tuple[Agent, float]:
    tmp.mkdir(parents=True, exist_ok=True)
    config = agent_config(model, pki.tls_config(), gateway_port=free_port(), model_port=free_port(),
                          model_gateway={"max_tokens": 512, "max_concurrency": slots, "queue_length": 64,
                                         "queue_timeout_s": 300, "request_timeout_s": 600,
                                         "rate_limit": {"requests_per_second": 1000, "burst": 1000},
                                         "allowed_clients": []},
                          model_server={"engine": engine, "parallel_slots": slots, "threads": THREADS,
                                        "startup_timeout_s": 600},
                          context_window=1024)
    path = tmp / "clawbot.json"
    path.write_text(json.dumps(config, indent=2))
    began = time.perf_counter()
    agent = Agent(path, tmp / "state", pki).start()
    agent.wait_ready(timeout=600)
    return agent, time.perf_counter() - began


def run_bench(url: str, pki, levels: list[int], requests: int, max_tokens: int, tls: bool, api_key: str | None = None) -> dict:
    kwargs = dict(cacert=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key)) if tls else {"api_key": api_key}
    return asyncio.run(bench.bench(url, concurrency=levels, requests=requests, prompt_tokens=128,
                                   max_tokens=max_tokens, ignore_eos=True, **kwargs))


def median_report(reports: list[dict]) -> dict:
    """Per concurrency level, the median over rounds of TTFT p50, ITL p50 and output tok/s."""
    import statistics

    levels = []
    for lv in reports[0]["levels"]:
        c = lv["concurrency"]
        same = [level(r, c) for r in reports]
        levels.append({"concurrency": c, "rounds": len(same),
                       "ttft_ms": {"p50": round(statistics.median(x["ttft_ms"]["p50"] for x in same), 2)},
                       "itl_ms": {"p50": round(statistics.median(x["itl_ms"]["p50"] for x in same), 2)},
                       "output_throughput_tok_s": round(statistics.median(x["output_throughput_tok_s"] for x in same), 2),
                       "failed": sum(x["failed"] for x in same)})
    return {"levels": levels}


def level(report: dict, concurrency: int) -> dict:
    return next(lv for lv in report["levels"] if lv["concurrency"] == concurrency)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gateway.json"))
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating gateway/direct rounds")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--skip-sizes", action="store_true", help="skip the start-time-vs-size series")
    parser.add_argument("--preset", default="test-100m", help="clawbot.tools.modelgen preset of the benchmark model")
    parser.add_argument("--quant", default="Q8_0", choices=["Q8_0", "Q4_0"])
    args = parser.parse_args()

    find_llama_server("cpu") or build_engine("cpu")
    CACHE.mkdir(parents=True, exist_ok=True)
    work = CACHE / f"run-{os.getpid()}"
    pki = make_pki(work / "pki")
    model = CACHE / f"{args.preset}-{args.quant}.gguf"
    if not model.exists():
        tmp = write_model_file(CACHE, args.preset, args.quant)
        tmp.rename(model) if tmp != model else None
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "python": platform.python_version()},
                     "model": {"path": str(model), "bytes": model.stat().st_size, "preset": args.preset, "quant": args.quant},
                     "settings": {"requests_per_level": args.requests, "max_tokens": args.max_tokens,
                                  "prompt_tokens": 128, "threads": THREADS, "parallel_slots": 4}}

    agent, ready_s = start(work / "llama-server", pki, model, "llama-server")
    try:
        direct_url = f"http://127.0.0.1:{agent.config['model_server']['port']}"
        # gateway and direct alternate round by round: this machine is shared, and load drifts over minutes
        rounds = {"gateway": [], "direct": []}
        for _ in range(args.rounds):
            rounds["gateway"].append(run_bench(agent.url, pki, [1, 4], args.requests, args.max_tokens, True))
            key = (agent.state_dir / "model-server.key").read_text().strip()
            rounds["direct"].append(run_bench(direct_url, pki, [1, 4], args.requests, args.max_tokens, False, key))
        results["rounds"] = rounds
        results["gateway_llama_server"] = median_report(rounds["gateway"])
        results["direct_llama_server"] = median_report(rounds["direct"])
        results["agent_start_to_ready_s"] = round(ready_s, 2)
    finally:
        agent.stop()
    agent, _ = start(work / "llama-cpp-python", pki, model, "llama-cpp-python", slots=1)
    try:
        results["gateway_llama_cpp_python"] = run_bench(agent.url, pki, [1, 4], args.requests, args.max_tokens, True)
    finally:
        agent.stop()

    if not args.skip_sizes:
        sizes = []
        for preset, overrides in (("tiny", {}), ("test-100m", {}), ("test-100m", {"n_layer": 40})):
            path = model if (preset, overrides) == ("test-100m", {}) else write_model_file(CACHE, preset, "Q8_0", **overrides)
            read = cold_read_mb_s(path)
            evict(path)
            agent, took = start(work / f"size-{path.stem}", pki, path, "llama-server")
            try:
                load_s = agent.status()["model"]["load_seconds"]
            finally:
                agent.stop()
            sizes.append({"model": path.name, "mib": round(path.stat().st_size / (1 << 20), 1),
                          "cold_read_mib_s": round(read, 1), "start_to_ready_s": round(took, 2),
                          "model_load_and_first_token_s": round(load_s, 2) if load_s else None})
        results["start_vs_size"] = sizes

    g1, d1 = level(results["gateway_llama_server"], 1), level(results["direct_llama_server"], 1)
    g4, d4 = level(results["gateway_llama_server"], 4), level(results["direct_llama_server"], 4)
    p4 = level(results["gateway_llama_cpp_python"], 4)
    results["summary"] = {
        "ttft_p50_ms": {"gateway": g1["ttft_ms"]["p50"], "direct": d1["ttft_ms"]["p50"],
                        "added_ms": round(g1["ttft_ms"]["p50"] - d1["ttft_ms"]["p50"], 2)},
        "tok_s_1_stream": {"gateway": g1["output_throughput_tok_s"], "direct": d1["output_throughput_tok_s"],
                           "ratio": round(g1["output_throughput_tok_s"] / d1["output_throughput_tok_s"], 3)},
        "tok_s_4_streams": {"gateway_llama_server": g4["output_throughput_tok_s"],
                            "direct_llama_server": d4["output_throughput_tok_s"],
                            "gateway_llama_cpp_python": p4["output_throughput_tok_s"]},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    summary = markdown(results)
    out.with_suffix(".md").write_text(summary)
    print(summary)
    return 0


def markdown(r: dict) -> str:
    s = r["summary"]
    lines = [
        f"### Gateway benchmark ({r['model']['preset']} {r['model']['quant']}, {r['model']['bytes'] / 2**20:.0f} MiB, "
        f"{r['machine']['cpus']} CPUs, {r['settings']['threads']} threads, {r['settings']['max_tokens']} output tokens)",
        "",
        "| measure | gateway (mTLS) | direct llama-server | ratio / added |",
        "| --- | --- | --- | --- |",
        f"| first token p50, 1 stream | {s['ttft_p50_ms']['gateway']} ms | {s['ttft_p50_ms']['direct']} ms | +{s['ttft_p50_ms']['added_ms']} ms |",
        f"| output tok/s, 1 stream | {s['tok_s_1_stream']['gateway']} | {s['tok_s_1_stream']['direct']} | {s['tok_s_1_stream']['ratio']} |",
        f"| output tok/s, 4 streams | {s['tok_s_4_streams']['gateway_llama_server']} | {s['tok_s_4_streams']['direct_llama_server']} | "
        f"{s['tok_s_4_streams']['gateway_llama_server'] / s['tok_s_4_streams']['direct_llama_server']:.3f} |",
        "",
        f"4 streams through the gateway with llama_cpp.server instead: {s['tok_s_4_streams']['gateway_llama_cpp_python']} tok/s "
        f"(one request at a time), vs {s['tok_s_4_streams']['gateway_llama_server']} with llama-server (4 slots).",
        "",
        f"Agent start → ready (model loaded and a 1-token completion answered): {r.get('agent_start_to_ready_s')} s.",
    ]
    if r.get("start_vs_size"):
        lines += ["", "| model | MiB | cold read MiB/s | agent start → ready s | load + first token s |", "| --- | --- | --- | --- | --- |"]
        for row in r["start_vs_size"]:
            lines.append(f"| {row['model']} | {row['mib']} | {row['cold_read_mib_s']} | {row['start_to_ready_s']} | "
                         f"{row['model_load_and_first_token_s']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
