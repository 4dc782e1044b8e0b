"""`clawbot bench URL`: first-token latency and throughput of an OpenAI-compatible endpoint.

Definitions follow vLLM's benchmark_serving so numbers compare with published ones:
TTFT = request sent → first content token; ITL = gaps between consecutive content tokens;
E2E = request sent → last byte; output throughput = total output tokens / wall time of the level;
request throughput = completed requests / wall time. Works against the mTLS gateway (--cacert/--cert/
--key) and against a plain llama-server or llama_cpp.server (http://), which is how the gateway's
overhead is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field

import httpx

from clawbot.common.modelclient import sse_events

DEFAULT_PROMPT_WORD = "hello "


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""
    retried: bool = False


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(results: list[RequestResult], concurrency: int, wall_s: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    itl = [gap for r in ok for gap in r.itl_s]
    tokens = sum(r.output_tokens for r in ok)

    def ms(v):
        return None if v is None else round(v * 1000, 2)

    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "resent": sum(1 for r in results if r.retried),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "wall_s": round(wall_s, 3),
        "request_throughput_rps": round(len(ok) / wall_s, 3) if wall_s > 0 else None,
        "output_tokens": tokens,
        "output_throughput_tok_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
        "ttft_ms": {"mean": ms(statistics.fmean(ttft)) if ttft else None, "p50": ms(percentile(ttft, 50)),
                    "p90": ms(percentile(ttft, 90)), "p99": ms(percentile(ttft, 99))},
        "itl_ms": {"mean": ms(statistics.fmean(itl)) if itl else None, "p50": ms(percentile(itl, 50)),
                   "p90": ms(percentile(itl, 90)), "p99": ms(percentile(itl, 99))},
        "e2e_ms": {"mean": ms(statistics.fmean(e2e)) if e2e else None, "p50": ms(percentile(e2e, 50)),
                   "p90": ms(percentile(e2e, 90))},
    }


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, model: str | None,
                      ignore_eos: bool) -> RequestResult:
    # a unique first word per request: no request reuses another's KV cache prefix (llama-server caches
    # prompts per slot), so TTFT always includes the whole prompt's evaluation, as in vLLM's benchmark
    prompt = f"{uuid.uuid4().hex[:8]} {prompt}"
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True,
            "temperature": 0.7, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    if ignore_eos:
        body["ignore_eos"] = True
    start = time.perf_counter()
    result = await _attempt(client, url, body, start)
    if result.error.startswith("RemoteProtocolError") and "without sending a response" in result.error:
        # a kept-alive connection the server had just closed (llama-server drops it after every streamed
        # answer): sent once more, as the openai client's own retry does; the time of both attempts counts
        result = await _attempt(client, url, body, start)
        result.retried = True
    return result


async def _attempt(client: httpx.AsyncClient, url: str, body: dict, start: float) -> RequestResult:
    last = None
    usage_tokens = None
    result = RequestResult(ok=False)
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                result.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                return result
            # sse_events reads the body to its end after [DONE], as the openai client does: an abandoned body
            # closes the keep-alive connection, and the next request would be timed with a new TLS handshake
            async for obj in sse_events(resp):
                if isinstance(obj.get("usage"), dict) and obj["usage"].get("completion_tokens") is not None:
                    usage_tokens = obj["usage"]["completion_tokens"]
                if "error" in obj:
                    result.error = str(obj["error"].get("message", obj["error"]))[:200]
                    return result
                for choice in obj.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if last is None:
                            result.ttft_s = now - start
                        else:
                            result.itl_s.append(now - last)
                        last = now
                        result.output_tokens += 1
        if usage_tokens is not None:  # events can merge tokens (partial UTF-8): the server's count is exact
            result.output_tokens = usage_tokens
        result.e2e_s = time.perf_counter() - start
        result.ok = result.output_tokens > 0
        if not result.ok:
            result.error = "no tokens"
    except (httpx.HTTPError, ValueError) as exc:
        result.error = f"{exc.__class__.__name__}: {exc}"[:200]
    return result


async def run_level(client, url, prompt, max_tokens, model, concurrency, n_requests, ignore_eos) -> dict:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)
    results: list[RequestResult] = []

    async def worker():
        while True:
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results.append(await one_request(client, url, prompt, max_tokens, model, ignore_eos))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(results, concurrency, time.perf_counter() - start)


async def make_prompt(client: httpx.AsyncClient, url: str, n_tokens: int) -> str:
    """A prompt of about n_tokens, calibrated with the server's tokenizer when it offers one."""
    text = DEFAULT_PROMPT_WORD * max(1, n_tokens)
    for path, body in (("/v1/tokenize", {"content": text}), ("/tokenize", {"content": text})):
        try:
            r = await client.post(url + path, json=body)
            if r.status_code == 200:
                count = len(r.json()["tokens"])
                if count > 0:
                    words = max(1, round(n_tokens * n_tokens / count))
                    return DEFAULT_PROMPT_WORD * words
        except (httpx.HTTPError, ValueError, KeyError):
            continue
    return text


async def bench(url: str, *, concurrency: list[int], requests: int, prompt_tokens: int, max_tokens: int,
                model: str | None = None, cacert: str | None = None, cert: str | None = None, key: str | None = None,
                ignore_eos: bool = True, warmup: int = 1, api_key: str | None = None) -> dict:
    import ssl

    verify: ssl.SSLContext | bool = True
    if cacert or cert:
        verify = ssl.create_default_context(cafile=cacert)
        if cert:
            verify.load_cert_chain(cert, key)
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with httpx.AsyncClient(verify=verify, headers=headers,
                                 timeout=httpx.Timeout(600, connect=10),
                                 limits=httpx.Limits(max_connections=max(concurrency) + 4)) as client:
        prompt = await make_prompt(client, url, prompt_tokens)
        for _ in range(warmup):
            await one_request(client, url, prompt, min(8, max_tokens), model, ignore_eos)
        levels = []
        for c in concurrency:
            levels.append(await run_level(client, url, prompt, max_tokens, model, c, max(requests, c), ignore_eos))
    return {"url": url, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "requests_per_level": requests,
            "levels": levels}


def format_table(report: dict) -> str:
    head = f"{'conc':>4} {'ok':>4} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p90':>9} {'ITL p50':>8} {'ITL p90':>8} {'E2E p50':>9}"
    lines = [f"{report['url']}  prompt≈{report['prompt_tokens']} tok  max_tokens={report['max_tokens']}", head]
    for lv in report["levels"]:
        def f(v):
            return "-" if v is None else f"{v:.1f}"
        lines.append(f"{lv['concurrency']:>4} {lv['completed']:>4} {f(lv['request_throughput_rps']):>7} "
                     f"{f(lv['output_throughput_tok_s']):>10} {f(lv['ttft_ms']['p50']):>9} {f(lv['ttft_ms']['p90']):>9} "
                     f"{f(lv['itl_ms']['p50']):>8} {f(lv['itl_ms']['p90']):>8} {f(lv['e2e_ms']['p50']):>9}")
        if lv["errors"]:
            lines.append(f"     errors: {'; '.join(lv['errors'])}")
    lines.append("(latencies in ms)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="base URL, e.g. https://model-node:5000 (gateway) or http://127.0.0.1:8081")
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated levels (default 1,2,4,8)")
    parser.add_argument("--requests", type=int, default=16, help="requests per level (default 16)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model", default=None, help="model name to send (default: none, the server's own)")
    parser.add_argument("--no-ignore-eos", action="store_true", help="let generation stop at EOS")
    parser.add_argument("--cacert")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--api-key-file", help="bearer key for a model server measured directly (the agent "
                        "writes it to STATE_DIR/model-server.key)")
    parser.add_argument("--json", dest="json_out", help="write the full report here")


def run(args: argparse.Namespace) -> int:
    try:
        levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        print(f"clawbot bench: --concurrency must be integers like 1,2,4 (got {args.concurrency!r})", file=sys.stderr)
        return 2
    report = asyncio.run(bench(args.url, concurrency=levels, requests=args.requests, prompt_tokens=args.prompt_tokens,
                               max_tokens=args.max_tokens, model=args.model, cacert=args.cacert, cert=args.cert,
                               key=args.key, ignore_eos=not args.no_ignore_eos,
                               api_key=open(args.api_key_file).read().strip() if args.api_key_file else None))
    print(format_table(report))
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0 if all(lv["failed"] == 0 for lv in report["levels"]) else 1


def report_dict(results: list[RequestResult]) -> list[dict]:  # for tests and the benchmark script
    return [asdict(r) for r in results]
