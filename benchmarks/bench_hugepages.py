"""Hugepages benchmark: weights staged into hugetlbfs (2 MiB pages) vs the same file mmapped from ext4.

    python benchmarks/bench_hugepages.py [--rounds 6] [--preset llama-3.2-1b] [--quant Q8_0]

One generated model of >= 0.8 GB (clawbot.tools.modelgen, random weights: speed does not depend on the values),
kept in ~/.cache/clawbot/bench (never in the repo). Two llama-server processes of this process tree run
side by side, -t 1 each (2 cores), one on the ext4 file and one on the staged copy, both `-lm mmap`; the
runs alternate between them (ABBA order) so drift in the VM hits both alike. Per run: prefill tok/s (a
~128-token prompt, 1 token out, no prompt cache) and decode tok/s (32 tokens), from llama-server's own
timings. Model-ready time both ways with the file evicted from the page cache first (a service start after
boot): ext4 = load; staged = copy into huge pages + load; staged again = reuse of the copy + load.
The smaps KernelPageSize of each server's weight mapping is recorded: the comparison is only valid if
the staged one shows 2048 kB and the ext4 one 4 kB.

Kernel-global state (vm.nr_hugepages, the hugetlbfs mount) is restored/unmounted at the end.
Results: benchmarks/results/hugepages.json and hugepages.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

from clawbot.common import preflight, sizing  # noqa: E402
from clawbot.common.config import defaults  # noqa: E402
from clawbot.model import staging  # noqa: E402
from clawbot.model.engines import Paths, llama_server  # noqa: E402
from clawbot.model.engines.build import build_engine, find_llama_server  # noqa: E402
from clawbot.model.runplan import RunPlan  # noqa: E402
from bench_gateway import evict  # noqa: E402  (drops only this file from the page cache)
from clawbot.model.supervisor import file_sha256, model_mappings  # noqa: E402
from tests.fixtures_agent import free_port  # noqa: E402
from tests.fixtures_models import write_model_file  # noqa: E402

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clawbot" / "bench"
NR = Path("/proc/sys/vm/nr_hugepages")
PROMPT = ("The quick brown fox jumps over the lazy dog while the model server measures how fast it reads "
          "its weights from memory pages of different sizes.")  # ~120 tokens: 5 s of prefill at -t 1
DECODE_TOKENS = 32


def reserve(pages: int) -> None:
    """Make `pages` huge pages free on top of what others use (the pool is kernel-global and shared)."""
    info = preflight.read_meminfo()
    in_use = info["HugePages_Total"] - info["HugePages_Free"] + info.get("HugePages_Rsvd", 0)
    NR.write_text(str(in_use + pages))
    free = preflight.read_meminfo()["HugePages_Free"]
    if free < pages:
        raise RuntimeError(f"asked the kernel for {pages} free huge pages, it has {free}")


def bench_config(port: int) -> dict:
    config = defaults()
    config["context_window"] = 512
    config["model_server"].update(port=port, threads=1, parallel_slots=1, load_mode="mmap", accelerator="cpu",
                                  model_name="bench")
    return config


def agent_plan(model: Path) -> RunPlan:
    """The run plan the agent would start this model with here (-np, -t, -ngl, ... as the agent decides them)."""
    facts = preflight.host_facts(preflight.read_node(str(model)), engine_builds=frozenset({"cpu"}))
    return RunPlan.resolve(bench_config(0), facts, sizing.read_model_info(model))


class Server:
    """One llama-server in its own process group (killed by that group), flags as the agent sets them."""

    def __init__(self, binary: Path, model: str, label: str, plan: RunPlan):
        config = bench_config(free_port())
        self.label, self.model, self.port = label, model, config["model_server"]["port"]
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{label}-", suffix=".log", delete=False)
        command = llama_server.command(plan, config, Paths(model=model, binary=str(binary)))
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=300)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.label} not ready within {timeout} s")

    def completion(self, n_predict: int) -> dict:
        r = self.client.post("/completion", json={"prompt": PROMPT, "n_predict": n_predict, "temperature": 0,
                                                  "cache_prompt": False, "ignore_eos": True})
        r.raise_for_status()
        return r.json()["timings"]

    def page_sizes(self) -> list[int]:
        return sorted({m.get("KernelPageSize", 0) for m in model_mappings(self.proc.pid, self.model)})

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        os.unlink(self.log.name)


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "runs": [round(v, 2) for v in values]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--quant", default="Q8_0")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "hugepages.json"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_hugepages: needs root (vm.nr_hugepages and a hugetlbfs mount)", file=sys.stderr)
        return 2
    binary = find_llama_server("cpu") or build_engine("cpu", native=False)
    CACHE.mkdir(parents=True, exist_ok=True)
    model = CACHE / f"{args.preset}-{args.quant}.gguf"
    if not model.exists():
        print(f"generating {model} ...", flush=True)
        write_model_file(CACHE, args.preset, args.quant)
    size = model.stat().st_size
    assert size >= 0.8e9, f"{model} is {size} bytes: the benchmark wants >= 0.8 GB"
    print(f"model {model.name}: {size / 2**20:.0f} MiB", flush=True)
    plan = agent_plan(model)  # one plan for every server: the runs differ only in where the weights sit
    print(f"run plan: -np {plan.slots.value} ({plan.slots.reason}), -t {plan.threads.value}", flush=True)

    saved_nr = NR.read_text()
    work = Path(tempfile.mkdtemp(prefix="bench-hugepages-"))
    mount, state = work / "hugepages", work / "state"
    servers: list[Server] = []
    result: dict = {}
    try:
        staging.ensure_mount(mount)
        sha = file_sha256(model, state)  # the agent caches this across starts; not part of a start's cost

        evict(model)
        t0 = time.monotonic()
        ext4 = Server(binary, str(model), "ext4", plan)
        servers.append(ext4)
        ext4.wait_ready()
        ready_ext4 = time.monotonic() - t0

        reserve(sizing.hugepages_for(size))
        evict(model)
        t0 = time.monotonic()
        staged_model = staging.stage(model, mount, state, sha)
        copy_s = time.monotonic() - t0
        staged = Server(binary, staged_model.path, "staged", plan)
        servers.append(staged)
        staged.wait_ready()
        ready_staged = time.monotonic() - t0
        pages = {"ext4": ext4.page_sizes(), "staged": staged.page_sizes()}
        print(f"ready: ext4 {ready_ext4:.2f} s, staged {ready_staged:.2f} s (copy {copy_s:.2f} s); "
              f"page sizes {pages}", flush=True)

        runs: dict[str, dict[str, list[float]]] = {s.label: {"prefill": [], "decode": []} for s in servers}
        for s in servers:  # warm-up: first requests allocate buffers
            s.completion(4)
        for i in range(args.rounds):
            order = [ext4, staged] if i % 2 == 0 else [staged, ext4]
            for s in order:
                pre = s.completion(1)
                dec = s.completion(DECODE_TOKENS)
                runs[s.label]["prefill"].append(pre["prompt_per_second"])
                runs[s.label]["decode"].append(dec["predicted_per_second"])
                print(f"round {i + 1} {s.label:6}: prefill {pre['prompt_per_second']:.1f} tok/s "
                      f"({pre['prompt_n']} tokens), decode {dec['predicted_per_second']:.2f} tok/s", flush=True)
        prompt_tokens = pre["prompt_n"]
        for s in list(servers):
            s.stop()
            servers.remove(s)

        evict(model)
        t0 = time.monotonic()
        again = staging.stage(model, mount, state, sha)
        assert again.reused
        staged2 = Server(binary, again.path, "staged-reuse", plan)
        servers.append(staged2)
        staged2.wait_ready()
        ready_reuse = time.monotonic() - t0
        staged2.stop()
        servers.remove(staged2)

        med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in runs.items()}
        result = {
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": 1,
                        "python": platform.python_version()},
            "model": {"file": model.name, "bytes": size, "preset": args.preset, "quant": args.quant,
                      "hugepages": staged_model.pages},
            "kernel_page_size_kib": pages,
            "rounds": args.rounds, "prompt_tokens": prompt_tokens, "decode_tokens": DECODE_TOKENS,
            "decode_tok_s": {k: summary(r["decode"]) for k, r in runs.items()},
            "prefill_tok_s": {k: summary(r["prefill"]) for k, r in runs.items()},
            "ratio_staged_over_ext4": {
                "decode": round(med["staged"]["decode"] / med["ext4"]["decode"], 3),
                "prefill": round(med["staged"]["prefill"] / med["ext4"]["prefill"], 3)},
            "ready_s": {"ext4_cold": round(ready_ext4, 2), "staged_cold_copy_and_load": round(ready_staged, 2),
                        "staged_copy_only": round(copy_s, 2), "staged_reuse": round(ready_reuse, 2)},
        }
    finally:
        for s in servers:
            s.stop()
        staging.release(state, mount)
        if staging.is_hugetlbfs(mount):
            staging.unmount(mount)
        NR.write_text(saved_nr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def rewrite_markdown(json_path: Path) -> None:
    """Regenerate the .md from a saved result (no re-run)."""
    json_path.with_suffix(".md").write_text(markdown(json.loads(json_path.read_text())))


def markdown(r: dict) -> str:
    d, p, ratio, ready = r["decode_tok_s"], r["prefill_tok_s"], r["ratio_staged_over_ext4"], r["ready_s"]
    return f"""# Hugepages: staged (hugetlbfs, 2 MiB pages) vs ext4 (4 KiB pages)

Model {r['model']['file']} ({r['model']['bytes'] / 2**20:.0f} MiB, {r['model']['hugepages']} huge pages), llama-server
-t 1 -lm mmap, {r['rounds']} alternated rounds, {r['machine']['cpus']} CPUs ({r['machine']['platform']}).
Weight mapping KernelPageSize: staged {r['kernel_page_size_kib']['staged']} kB, ext4 {r['kernel_page_size_kib']['ext4']} kB.

| | ext4 | staged | staged / ext4 |
|---|---|---|---|
| decode tok/s (median, min-max) | {d['ext4']['median']} ({d['ext4']['min']}-{d['ext4']['max']}) | {d['staged']['median']} ({d['staged']['min']}-{d['staged']['max']}) | {ratio['decode']} |
| prefill tok/s, {r['prompt_tokens']} tokens (median, min-max) | {p['ext4']['median']} ({p['ext4']['min']}-{p['ext4']['max']}) | {p['staged']['median']} ({p['staged']['min']}-{p['staged']['max']}) | {ratio['prefill']} |

Model-ready time, file evicted from the page cache first: ext4 {ready['ext4_cold']} s; staged {ready['staged_cold_copy_and_load']} s
(copy into huge pages {ready['staged_copy_only']} s); staged again, reusing the copy: {ready['staged_reuse']} s.

{decision(r)}
"""


def decision(r: dict) -> str:
    """What the numbers mean for `model_server.hugepages: auto` (decode is the memory-bound phase)."""
    d = r["decode_tok_s"]
    ratio = r["ratio_staged_over_ext4"]["decode"]
    overlap = d["staged"]["min"] <= d["ext4"]["max"] and d["ext4"]["min"] <= d["staged"]["max"]
    if ratio >= 1.03:
        verdict = "`auto` keeps staging on CPU nodes"
    elif ratio <= 0.97:
        verdict = "staging is slower here: `auto` should not stage"
    else:
        verdict = "no measurable difference: `auto` stages only for the pinning (no swap-out), not for speed"
    noise = (" The ranges overlap (other processes shared the 2 cores), so the gain is indicative, not proven."
             if overlap else "")
    return f"Decode staged/ext4 = {ratio}: {verdict}.{noise}"


if __name__ == "__main__":
    sys.exit(main())
