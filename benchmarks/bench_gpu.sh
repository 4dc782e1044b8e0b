#!/usr/bin/env bash
# GPU benchmark on a machine with no internet: offline setup, then benchmarks/bench_gpu.py.
#
#   bash benchmarks/bench_gpu.sh [bench_gpu.py args...]
#
# Expects, prepared on a machine with internet (git-ignored, never committed):
#   .carry/llama-src.tar.gz  the sdist's vendor/llama.cpp without models/docs/tests/examples
#                            (tar -czf ... llama-cpp-python-0.3.36 from ~/.cache/clawbot/src, ~10 MB)
#   .carry/whl/*.whl         wheels of clawbot's dependencies the machine lacks (fastapi, uvicorn, pydantic,
#                            cryptography, jsonschema, gguf, opentelemetry-api: fastapi 0.165 imports it) for
#                            its Python, with `pip download --no-deps --only-binary=:all: --python-version 3.12 ...`
# Everything it writes goes under $WORK (default /tmp/clawbot-gpu-bench): sources, site-packages, engine
# cache, the generated model (4.5 GB), logs. Results: benchmarks/results/gpu.json (or --out).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/clawbot-gpu-bench}
mkdir -p "$WORK"
if [ -f .carry/llama-src.tar.gz ] && [ ! -f "$WORK/src/llama-cpp-python-0.3.36/CMakeLists.txt" ]; then
    mkdir -p "$WORK/src" && tar -xzf .carry/llama-src.tar.gz -C "$WORK/src"
fi
SRC_ARGS=()
[ -f "$WORK/src/llama-cpp-python-0.3.36/CMakeLists.txt" ] && SRC_ARGS=(--source-dir "$WORK/src/llama-cpp-python-0.3.36")
if ! python3 -c 'import clawbot' 2>/dev/null; then
    SITE="$WORK/site"
    if [ -d .carry/whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .carry/whl/*.whl
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" --upgrade .
fi
export XDG_CACHE_HOME="$WORK/cache" PYTHONUNBUFFERED=1
exec python3 benchmarks/bench_gpu.py --work "$WORK" "${SRC_ARGS[@]}" "$@"
