#!/usr/bin/env bash
# GPU benchmark on a machine with no internet: offline setup, then benchmarks/bench_gpu.py.
#
#   bash benchmarks/bench_gpu.sh [bench_gpu.py args...]      e.g. --phase gpu --out $OUT/gpu-h200.json
#
# Expects, prepared on a machine with internet (git-ignored, never committed; ~20 MB in all):
#   .carry/llama-src.tar.gz  the sdist's vendor/llama.cpp without models/docs/tests/examples/media
#                            (cd ~/.cache/clawbot/src && tar -czf .../llama-src.tar.gz --exclude=... llama-cpp-python-0.3.36)
#   .carry/llcp-py.tar.gz    the sdist's own Python part (llama_cpp/, CMakeLists.txt, pyproject.toml, PKG-INFO,
#                            README.md, LICENSE.md; no vendor/): phase cpu builds llama-cpp-python from it and the
#                            sources above
#   .carry/whl/*.whl         wheels of what the machine lacks (fastapi, starlette, uvicorn, pydantic, pydantic-core,
#                            annotated-types, typing-inspection, typing-extensions, cryptography, cffi, pycparser,
#                            jsonschema, jsonschema-specifications, referencing, rpds-py, gguf, opentelemetry-api;
#                            for llama_cpp.server: pydantic-settings, python-dotenv, sse-starlette, starlette-context,
#                            diskcache) for its Python, with `pip download --no-deps --only-binary=:all:
#                            --python-version 3.12 --platform manylinux_2_28_x86_64 ...`
# Everything it writes goes under $WORK (default /tmp/clawbot-gpu-bench): sources, site-packages, engine cache, logs;
# the generated models go to /dev/shm when it has room. With $OUT set (the lent device), the logs come back as
# $OUT/logs-PHASE.tar.gz. A second call on the same (still warm) machine reuses the build and the models.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/clawbot-gpu-bench}
mkdir -p "$WORK/logs"
if [ -f .carry/llama-src.tar.gz ] && [ ! -f "$WORK/src/llama-cpp-python-0.3.36/CMakeLists.txt" ]; then
    mkdir -p "$WORK/src" && tar -xzf .carry/llama-src.tar.gz -C "$WORK/src"
fi
SRC_ARGS=()
[ -f "$WORK/src/llama-cpp-python-0.3.36/CMakeLists.txt" ] && SRC_ARGS=(--source-dir "$WORK/src/llama-cpp-python-0.3.36")
[ -f .carry/llcp-py.tar.gz ] && SRC_ARGS+=(--llama-cpp-python-src "$PWD/.carry/llcp-py.tar.gz")
if ! python3 -c 'import fastapi, clawbot' 2>/dev/null; then
    SITE="$WORK/site"
    if [ -d .carry/whl ] && [ ! -d "$SITE/fastapi" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .carry/whl/*.whl
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    # clawbot itself every time: the working tree may have changed since the last call
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" --upgrade . \
        >"$WORK/logs/pip-clawbot.log" 2>&1 || { cat "$WORK/logs/pip-clawbot.log"; exit 1; }
fi
export XDG_CACHE_HOME="$WORK/cache" PYTHONUNBUFFERED=1
PHASE=gpu
for ((i = 1; i <= $#; i++)); do [ "${!i}" = "--phase" ] && j=$((i + 1)) && PHASE=${!j}; done
python3 benchmarks/bench_gpu.py --work "$WORK" "${SRC_ARGS[@]}" "$@" 2>&1 | tee "$WORK/logs/console-$PHASE.log"
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then
    tar -czf "$OUT/logs-$PHASE.tar.gz" -C "$WORK" logs 2>/dev/null
fi
exit "$rc"
