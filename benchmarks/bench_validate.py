"""Wall time of `clawbot validate` vs `check-jsonschema` on the same files, alternated in one run.

Writes benchmarks/results/validate.json. Goal (issue 2): clawbot at most 0.5x check-jsonschema's time.
Run: python benchmarks/bench_validate.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "validate.json"


def sample_files(directory: Path) -> list[str]:
    """The configs users actually have: the article's (fixed) example, the default and the two-node one."""
    article = directory / "article.json"
    article.write_text('{"model_gateway": {"endpoint": "https://192.168.1.100:5000","max_tokens": 4096,'
                       '"temperature": 0.7},"context_window": 32768,"fallback_strategies": ["web_search","knowledge_base"]}')
    return [str(article), str(ROOT / "inventory" / ".clawbot" / "clawbot.json"),
            str(ROOT / "docs/examples/two-node/.clawbot/clawbot.json")]


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0,):
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    check_jsonschema = shutil.which("check-jsonschema")
    clawbot = shutil.which("clawbot")
    if not check_jsonschema or not clawbot:
        raise SystemExit("needs `clawbot` and `check-jsonschema` on PATH (pip install -e '.[test]')")
    with tempfile.TemporaryDirectory() as tmp:
        files = sample_files(Path(tmp))
        commands = {
            "clawbot validate": [clawbot, "validate", *files],
            "check-jsonschema": [check_jsonschema, "--schemafile", str(ROOT / "schemas" / "clawbot.schema.json"), *files],
        }
        for argv in commands.values():  # warm the page cache and .pyc files
            timed(argv)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, argv in commands.items():
                times[name].append(timed(argv))
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["clawbot validate"] / medians["check-jsonschema"]
    result = {
        "benchmark": "validate wall time, 3 files per invocation, alternated",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "rounds": args.rounds,
        "median_s": {k: round(v, 4) for k, v in medians.items()},
        "min_s": {k: round(min(v), 4) for k, v in times.items()},
        "ratio_clawbot_over_check_jsonschema": round(ratio, 3),
        "goal": "<= 0.5",
        "met": ratio <= 0.5,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
