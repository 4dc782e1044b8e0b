"""What a split costs per token: one model on one node vs the same model cut between a main node and an RPC worker.

    python benchmarks/bench_split.py [--rounds 5] [--preset test-100m] [--quant Q8_0] [--threads 1]

Three ways to run the same generated model (clawbot.tools.modelgen, random weights: speed does not depend on the
values; cached in ~/.cache/clawbot/bench), each a llama-server started from clawbot's own run plan and command line:

- `single`: every layer on this node;
- `split-direct`: the layers cut in two (the same memory offered on both sides), the second half served by a
  ggml-rpc-server on 127.0.0.1, reached directly (what llama.cpp's own README shows; never do this over a network);
- `split-tunnel`: the same cut, reached through the two stunnel processes clawbot deploys (roles/rpc.py's
  configurations, TLS 1.3 with client certificates from a throwaway CA), as a split runs in production.

Everything runs on loopback on this machine, so the numbers measure the per-token protocol cost (round trips
through the RPC client, the tunnel and the RPC server, and the cores the extra processes take), not a network; on
a LAN add the link's round-trip time for each synchronous RPC call per token. Per round, in rotating order: decode
tok/s (32 tokens after an 8-token prompt, from llama-server's own timings) and prefill tok/s (a ~120-token prompt).
Results: benchmarks/results/split.json and split.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from clawbot.common import pki, sizing  # noqa: E402
from clawbot.common.config import check_bytes  # noqa: E402
from clawbot.control.split import MainRole, Tunnel, WorkerRole  # noqa: E402
from clawbot.model import rpc  # noqa: E402
from clawbot.model.engines import Paths, build, llama_server  # noqa: E402
from clawbot.model.runplan import HostFacts, RunPlan  # noqa: E402
from roles import rpc as rpc_role  # noqa: E402
from tests.fixtures_agent import free_port  # noqa: E402
from tests.fixtures_models import write_model_file  # noqa: E402

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clawbot" / "bench"
PROMPT = ("The quick brown fox jumps over the lazy dog while the model server measures how fast it reads "
          "its weights from memory pages of different sizes, again and again, until the numbers settle.")
DECODE_TOKENS = 32


class Proc:
    def __init__(self, argv: list[str], log: Path, env: dict | None = None):
        self.log = log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, env={**os.environ, **(env or {})})

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - polled until it holds
            pass
        time.sleep(0.2)
    raise SystemExit(f"bench_split: timed out waiting for {what}")


def listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def config_for(model: Path, port: int, threads: int, workers: list[dict]) -> dict:
    result = check_bytes(json.dumps({
        "model_gateway": {"max_tokens": 64, "max_concurrency": 1}, "context_window": 1024,
        "chat": {"summary": {"max_tokens": 64}},
        "model_server": {"model_path": str(model), "port": port, "threads": threads, "parallel_slots": 1,
                         "accelerator": "cpu", "load_mode": "mmap", "hugepages": "off",
                         "split": {"workers": workers}},
    }).encode(), "bench.json")
    assert result.ok, [d.text() for d in result.diagnostics]
    return result.config


def start_server(binary: Path, model: Path, threads: int, work: Path, name: str, rpc_port: int | None):
    port = free_port()
    info = sizing.read_model_info(model)
    workers = [{"name": "worker", "port": rpc_port, "memory_mib": 4096}] if rpc_port else []
    config = config_for(model, port, threads, workers)
    plan = RunPlan.resolve(config, HostFacts(gpus=(), host_free_bytes=4096 * sizing.MIB, usable_cores=threads + 1,
                                             memlock_limit=0), info)
    argv = llama_server.command(plan, config, Paths(model=str(model), binary=str(binary)))
    proc = Proc(argv, work / f"{name}.log", rpc.ENVIRONMENT)
    wait(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200, 300, f"{name} to load")
    cut = plan.split.value
    return proc, port, (cut.to_json() if cut else None)


def measure(port: int) -> tuple[float, float]:
    """(decode tok/s, prefill tok/s) from llama-server's own timings."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        decode = client.post("/completion", json={"prompt": "Hello, my name is", "n_predict": DECODE_TOKENS,
                                                  "temperature": 0, "ignore_eos": True, "cache_prompt": False})
        prefill = client.post("/completion", json={"prompt": PROMPT * 2, "n_predict": 1, "temperature": 0,
                                                   "cache_prompt": False})
    return decode.json()["timings"]["predicted_per_second"], prefill.json()["timings"]["prompt_per_second"]


def throwaway_pki(directory: Path) -> tuple[dict, dict]:
    permitted = dict(permitted_dns=["bench.test"], permitted_ips=["127.0.0.0/8"])
    ca_key, ca_cert = pki.create_ca("bench CA", **permitted)
    pki.write_certificate(directory / "ca.pem", ca_cert)
    paths = {}
    for name, issue, names in (("worker", pki.issue_server_cert, ["worker.bench.test"]),
                               ("main", pki.issue_client_cert, ["main.bench.test"])):
        key, cert = issue(ca_key, ca_cert, name, dns_names=names)
        pki.write_certificate(directory / f"{name}.pem", cert)
        pki.write_private_key(directory / f"{name}.key", key)
        paths[name] = {"ca_cert": str(directory / "ca.pem"), "server_cert": str(directory / f"{name}.pem"),
                       "server_key": str(directory / f"{name}.key"), "client_cert": str(directory / f"{name}.pem"),
                       "client_key": str(directory / f"{name}.key")}
    return paths["worker"], paths["main"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--preset", default="test-100m")
    parser.add_argument("--quant", default="Q8_0")
    parser.add_argument("--threads", type=int, default=1, help="llama-server -t and ggml-rpc-server -t")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "split"))
    args = parser.parse_args()
    binary = build.find_llama_server("cpu") or build.build_engine("cpu", native=False)
    rpc_binary = build.find_tool(build.RPC_TARGET)
    if rpc_binary is None:
        raise SystemExit("bench_split: no ggml-rpc-server beside llama-server: run `clawbot build-engine` again")
    CACHE.mkdir(parents=True, exist_ok=True)
    model = CACHE / f"{args.preset}-{args.quant}.gguf"
    if not model.exists():
        model = write_model_file(CACHE, args.preset, args.quant)
    procs: list[Proc] = []
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-split-") as tmp:
        work = Path(tmp)
        try:
            worker_tls, main_tls = throwaway_pki(work)
            role = WorkerRole(main="main.bench.test", address="127.0.0.1", rpc_port=free_port(),
                              tunnel_port=free_port(), threads=args.threads, cache=False)
            env = {**rpc_role.RPC_ENVIRONMENT, "LLAMA_CACHE": str(work), "HOME": str(work)}
            rpc_server = Proc(shlex.split(rpc_role.rpc_server_command(str(rpc_binary), role)), work / "rpc.log", env)
            procs.append(rpc_server)
            wait(lambda: listening(role.rpc_port), 60, "ggml-rpc-server")
            (work / "worker.conf").write_text(rpc_role.worker_tunnel_config(role, worker_tls))
            procs.append(Proc([rpc_role.STUNNEL, str(work / "worker.conf")], work / "worker-stunnel.log"))
            local = free_port()
            main_role = MainRole((Tunnel("worker.bench.test", "127.0.0.1", role.tunnel_port, local),))
            (work / "main.conf").write_text(rpc_role.main_tunnel_config(main_role, main_tls))
            procs.append(Proc([rpc_role.STUNNEL, str(work / "main.conf")], work / "main-stunnel.log"))
            wait(lambda: listening(role.tunnel_port) and listening(local), 60, "the stunnels")
            ways = {"single": None, "split-direct": role.rpc_port, "split-tunnel": local}
            rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
            cuts = {}
            for index in range(args.rounds):
                order = list(ways)[index % 3:] + list(ways)[:index % 3]  # rotate who goes first
                for name in order:
                    server, port, cuts[name] = start_server(binary, model, args.threads, work, name, ways[name])
                    try:
                        measure(port)  # warm-up: first touch of the pages, the worker's first graph
                        rounds[name].append(measure(port))
                    finally:
                        server.stop()  # ggml-rpc-server serves one client at a time
                    print(f"round {index + 1} {name}: decode {rounds[name][-1][0]:.1f} tok/s, "
                          f"prefill {rounds[name][-1][1]:.1f} tok/s", flush=True)
            for name, values in rounds.items():
                decode = [v[0] for v in values]
                prefill = [v[1] for v in values]
                results[name] = {"decode_tok_s": decode, "prefill_tok_s": prefill,
                                 "decode_median": statistics.median(decode), "prefill_median": statistics.median(prefill),
                                 "ms_per_token_median": 1000 / statistics.median(decode), "cut": cuts[name]}
        finally:
            for proc in reversed(procs):
                proc.stop()
    single = results["single"]
    summary = {name: {"decode_ratio": r["decode_median"] / single["decode_median"],
                      "prefill_ratio": r["prefill_median"] / single["prefill_median"],
                      "extra_ms_per_token": r["ms_per_token_median"] - single["ms_per_token_median"]}
               for name, r in results.items()}
    info = sizing.read_model_info(model)
    report = {"model": {"preset": args.preset, "quant": args.quant, "file_bytes": info.file_bytes,
                        "n_layer": info.n_layer}, "threads": args.threads, "rounds": args.rounds,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "results": results, "summary": summary}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Split vs one node ({args.preset} {args.quant}, {info.n_layer} layers, "
             f"{info.file_bytes / 2**20:.0f} MiB; -t {args.threads}; {args.rounds} rounds; {os.cpu_count()} CPUs)", "",
             "| way | decode tok/s (median) | ms/token | vs single | prefill tok/s (median) | vs single |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        s = summary[name]
        lines.append(f"| {name} | {r['decode_median']:.1f} | {r['ms_per_token_median']:.2f} "
                     f"({s['extra_ms_per_token']:+.2f}) | {s['decode_ratio']:.2f}x | {r['prefill_median']:.1f} | "
                     f"{s['prefill_ratio']:.2f}x |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
