"""`clawbot bench URL`: first-token latency and throughput of an OpenAI-compatible endpoint, or (`--users N`)
a chat node driven the way people use it.

Fixed concurrency (the default). Definitions follow vLLM's benchmark_serving so numbers compare with published
ones: TTFT = request sent → first content token; ITL = gaps between consecutive content tokens; E2E = request
sent → last byte; output throughput = total output tokens / wall time of the level; request throughput =
completed requests / wall time (it includes each request's wait for its first token); TPOT = (E2E - TTFT) /
(output tokens - 1), the time per output token once the first is out, and decode/s = 1 / TPOT per stream: these two
compare with llama-bench's tg figures, output throughput does not. Works against the mTLS gateway
(--cacert/--cert/--key) and against a plain llama-server or llama_cpp.server (http://), which is how the gateway's
overhead is measured. From llama-server's `timings` in the last event: its own decode rate and, with speculative
decoding, drafted and accepted tokens (the acceptance rate).

Energy (`--energy`): power sampled in a thread every --sample-interval seconds from this machine's sensors
(clawbot.model.power: NVML / nvidia-smi, RAPL, hwmon) or from the gateway's /metrics; each level reports its joules
(energy counters where the sensors have them, else power integrated), per output token and per request, with the
number of samples and their real interval, and the idle power measured for 1 s before the first level; one stream at
a time, prefill and decode apart where the sensor's counter updates at least twice per first-token time. No sensor:
`not available`, never an estimate.

People (`--users N --duration S --keys FILE`): N simulated people, each with its own account's API key, use the
chat node's conversation API (`POST /api/conversations`, then `POST /api/conversations/{id}/messages`, reading
the whole Server-Sent-Event reply). Each person starts a conversation, sends a short question, reads the reply,
thinks (exponentially distributed, mean `--think-s`, from a generator seeded by `--seed` and the person's
number, so every run draws the same questions and pauses), sends the next, and starts a new conversation every
`--messages-per-conversation` messages. At `--duration` nobody sends anything new; messages in flight may
finish for `--drain-s` more, then they are cut (and counted as failed). Every message sent is exactly one of:
answered (source `model`, status `complete`), unavailable (answered by a fallback, or the "model is
unavailable" text), failed (an HTTP error, a broken or cut stream, any other reply). Waited (orthogonal): the
message had `queued` events or `meta.queue_wait_s` > 0. Times, as the person sees them: wait =
`meta.queue_wait_s` (the chat node's own measure of the time in line), first token = send → first `token`
event, reply = send → `done` event; their percentiles are over answered messages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import ssl
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import AsyncIterator

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
    sent_at: float | None = None  # perf_counter at send, first content token, last byte (energy windows)
    first_at: float | None = None
    end_at: float | None = None
    timings: dict | None = None  # llama-server's `timings` of the last event (draft_n / draft_n_accepted with
    # speculative decoding, predicted_per_second: its own decode rate)


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

    # time per output token after the first (vLLM's TPOT) and the decode rate it makes, per request: the first
    # token's wait (prompt evaluation) is in ttft_ms only
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok
            if r.e2e_s is not None and r.ttft_s is not None and r.output_tokens > 1]
    server_rate = [r.timings["predicted_per_second"] for r in ok
                   if r.timings and isinstance(r.timings.get("predicted_per_second"), (int, float))]
    drafted = [r.timings for r in ok if r.timings and "draft_n" in r.timings]
    speculative = None
    if drafted:
        n, accepted = sum(t["draft_n"] for t in drafted), sum(t.get("draft_n_accepted", 0) for t in drafted)
        speculative = {"requests_with_drafts": len(drafted), "draft_n": n, "draft_n_accepted": accepted,
                       "acceptance_rate": round(accepted / n, 4) if n else None}
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
        "tpot_ms": {"mean": ms(statistics.fmean(tpot)) if tpot else None, "p50": ms(percentile(tpot, 50)),
                    "p90": ms(percentile(tpot, 90))},
        # one stream's decode rate once its first token is out (1 / TPOT), median over requests
        "decode_tok_s_per_stream": round(1 / percentile(tpot, 50), 2) if tpot else None,
        "server_decode_tok_s_p50": round(percentile(server_rate, 50), 2) if server_rate else None,
        "speculative": speculative,
    }


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, model: str | None,
                      ignore_eos: bool, temperature: float = 0.7) -> RequestResult:
    # a unique first word per request: no request reuses another's KV cache prefix (llama-server caches
    # prompts per slot), so TTFT always includes the whole prompt's evaluation, as in vLLM's benchmark
    prompt = f"{uuid.uuid4().hex[:8]} {prompt}"
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True,
            "temperature": temperature, "stream_options": {"include_usage": True}}
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
                if isinstance(obj.get("timings"), dict):
                    result.timings = obj["timings"]
                if "error" in obj:
                    result.error = str(obj["error"].get("message", obj["error"]))[:200]
                    return result
                for choice in obj.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if last is None:
                            result.ttft_s = now - start
                            result.first_at = now
                        else:
                            result.itl_s.append(now - last)
                        last = now
                        result.output_tokens += 1
        if usage_tokens is not None:  # events can merge tokens (partial UTF-8): the server's count is exact
            result.output_tokens = usage_tokens
        result.end_at = time.perf_counter()
        result.e2e_s = result.end_at - start
        result.sent_at = start
        result.ok = result.output_tokens > 0
        if not result.ok:
            result.error = "no tokens"
    except (httpx.HTTPError, ValueError) as exc:
        result.error = f"{exc.__class__.__name__}: {exc}"[:200]
    return result


async def run_level(client, url, prompt, max_tokens, model, concurrency, n_requests, ignore_eos,
                    sampler=None, temperature: float = 0.7) -> dict:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)
    results: list[RequestResult] = []

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)

    async def worker():
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results.append(await one_request(client, url, prompts[i % len(prompts)], max_tokens, model, ignore_eos,
                                             temperature))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    end = time.perf_counter()
    level = summarize(results, concurrency, end - start)
    if sampler is not None:
        level["energy"] = await asyncio.to_thread(energy_of_level, sampler, level, results, start, end)
    return level


# ---------------------------------------------------------------------------------------------- energy

ENERGY_SAMPLE_INTERVAL_S = 0.1
IDLE_SAMPLE_S = 1.0


def energy_of_level(sampler, level: dict, results: list[RequestResult], start: float, end: float) -> dict:
    """Joules per output token and per request over the level's wall time, from the sampler's sensors (energy
    counters where they have them, else power samples integrated), with the sample count and interval. One stream
    at a time: prefill (send → first token) and decode (first → last token) apart, when the sensor's counter changes
    at least twice per first-token time; else said why not."""
    time.sleep(min(0.3, 3 * sampler.interval_s))  # one more sample after the end: the window's edge is bracketed
    window = sampler.window(start, end)
    if not window.get("available"):
        return window
    joules = window.get("energy_j")
    out = dict(window)
    tokens, completed = level["output_tokens"], level["completed"]
    out["joules_per_output_token"] = round(joules / tokens, 4) if joules is not None and tokens else None
    out["joules_per_request"] = round(joules / completed, 3) if joules is not None and completed else None
    idle = getattr(sampler, "idle_power_w", None)
    if joules is not None and idle is not None and tokens:
        above = joules - idle * (end - start)
        out["joules_per_output_token_above_idle"] = round(above / tokens, 4)
    if level["concurrency"] == 1:
        out["prefill_decode"] = _prefill_decode(sampler, results, level)
    return out


def _prefill_decode(sampler, results: list[RequestResult], level: dict) -> dict:
    ok = [r for r in results if r.ok and r.sent_at and r.first_at and r.end_at]
    update_s = sampler.counter_update_s() if hasattr(sampler, "counter_update_s") else None
    ttft_s = (level["ttft_ms"]["p50"] or 0) / 1000
    if not ok or update_s is None or update_s > ttft_s / 2:
        return {"resolved": False,
                "why": (f"the first token takes {ttft_s * 1000:.1f} ms and the sensor's energy changes every "
                        f"{update_s * 1000:.0f} ms: prefill and decode cannot be told apart" if update_s is not None
                        else "no energy counter to split at the first token")}
    prefill = sum(sampler.window(r.sent_at, r.first_at).get("energy_j") or 0 for r in ok)
    decode = sum(sampler.window(r.first_at, r.end_at).get("energy_j") or 0 for r in ok)
    decode_tokens = sum(r.output_tokens - 1 for r in ok)
    prompt_tokens = sum((r.timings or {}).get("prompt_n", 0) for r in ok)
    return {"resolved": True, "counter_update_s": round(update_s, 4),
            "prefill_joules_per_request": round(prefill / len(ok), 3),
            "prefill_joules_per_prompt_token": round(prefill / prompt_tokens, 5) if prompt_tokens else None,
            "decode_joules_per_token": round(decode / decode_tokens, 4) if decode_tokens else None}


def metrics_reader(url: str, verify, headers=None):
    """Power and energy as a gateway's /metrics exports them (clawbot_node_power_watts,
    clawbot_node_energy_joules_total): the model node's sensors, read from wherever the benchmark runs."""
    from prometheus_client.parser import text_string_to_metric_families

    from clawbot.model.power import Reading

    client = httpx.Client(verify=verify, headers=headers, timeout=10)

    def read() -> list[Reading]:
        text = client.get(url.rstrip("/") + "/metrics").text
        found: dict[str, dict] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                sensor = sample.labels.get("sensor")
                if not sensor:
                    continue
                entry = found.setdefault(sensor, {"kind": sample.labels.get("kind", ""),
                                                  "label": sample.labels.get("label", ""), "counted": True})
                if sample.name == "clawbot_node_power_watts":
                    entry["power"] = sample.value
                elif sample.name == "clawbot_node_energy_joules_total":
                    entry["energy"] = sample.value
                    entry["counted"] = sample.labels.get("counted", "true") == "true"
        return [Reading(sensor=s, kind=e["kind"], label=e["label"], energy_j=e.get("energy"), power_w=e.get("power"),
                        counted=e["counted"]) for s, e in found.items()]
    return read


def open_sampler(energy: str, url: str, verify, headers, interval_s: float):
    """`--energy local|metrics|off`, or auto: this machine's sensors when it has any, else the gateway's /metrics
    (an https URL), else none. Returns (sampler or None, how)."""
    from clawbot.model import power

    if energy == "off":
        return None, "off"
    if energy in ("auto", "local"):
        sensors = power.Sensors()
        if sensors.read() or energy == "local":
            return power.Sampler(sensors, interval_s=interval_s).start(), f"local sensors ({sensors.nvidia_via} for NVIDIA)"
    if energy in ("auto", "metrics") and url.startswith("https://"):
        read = metrics_reader(url, verify, headers)
        try:
            has = bool(read())
        except (httpx.HTTPError, ValueError):
            has = False
        if has:
            # each read is a scrape of the gateway, which reads its sensors then: no faster than every 0.25 s
            return power.Sampler(read=read, interval_s=max(interval_s, 0.25)).start(), f"{url}/metrics"
    return None, "not available"


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
                ignore_eos: bool = True, warmup: int = 1, api_key: str | None = None, energy: str = "auto",
                sample_interval_s: float = ENERGY_SAMPLE_INTERVAL_S, prompt: str | list[str] | None = None,
                temperature: float = 0.7) -> dict:
    """+ energy: auto | local | metrics | off (see open_sampler)
    + prompt: the text to send instead of the calibrated filler, or a list: request i sends prompt[i % len]
      (speculative decoding needs text that repeats, and n-gram pools shared between requests need different texts)
    + temperature: instead of 0.7 (0: greedy)"""
    import ssl

    verify: ssl.SSLContext | bool = True
    if cacert or cert:
        verify = ssl.create_default_context(cafile=cacert)
        if cert:
            verify.load_cert_chain(cert, key)
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    sampler, energy_source = await asyncio.to_thread(open_sampler, energy, url, verify, headers, sample_interval_s)
    try:
        async with httpx.AsyncClient(verify=verify, headers=headers,
                                     timeout=httpx.Timeout(600, connect=10),
                                     limits=httpx.Limits(max_connections=max(concurrency) + 4)) as client:
            text = prompt if prompt is not None else await make_prompt(client, url, prompt_tokens)
            for _ in range(warmup):
                await one_request(client, url, text if isinstance(text, str) else text[-1], min(8, max_tokens),
                                  model, ignore_eos, temperature)
            idle = None
            if sampler is not None:
                t0 = time.perf_counter()
                await asyncio.sleep(IDLE_SAMPLE_S)
                await asyncio.sleep(min(0.3, 3 * sampler.interval_s))
                idle = sampler.window(t0, t0 + IDLE_SAMPLE_S)
                sampler.idle_power_w = (idle["energy_j"] / IDLE_SAMPLE_S) if idle.get("energy_j") is not None \
                    else idle.get("mean_power_w")
            levels = []
            for c in concurrency:
                levels.append(await run_level(client, url, text, max_tokens, model, c, max(requests, c), ignore_eos,
                                              sampler, temperature))
    finally:
        if sampler is not None:
            sampler.stop()
    report = {"url": url, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "requests_per_level": requests,
              "levels": levels, "energy_source": energy_source}
    if sampler is not None:
        report["power_sensors"] = sampler.sensors_json()
        report["idle"] = {"power_w": None if sampler.idle_power_w is None else round(sampler.idle_power_w, 2),
                          "samples": idle.get("samples") if idle else None, "window_s": IDLE_SAMPLE_S}
    return report


def format_table(report: dict) -> str:
    head = (f"{'conc':>4} {'ok':>4} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p90':>9} {'ITL p50':>8} "
            f"{'ITL p90':>8} {'TPOT p50':>9} {'decode/s':>9} {'E2E p50':>9} {'J/tok':>7} {'J/req':>7}")
    lines = [f"{report['url']}  prompt≈{report['prompt_tokens']} tok  max_tokens={report['max_tokens']}", head]
    notes = []
    for lv in report["levels"]:
        def f(v, digits=1):
            return "-" if v is None else f"{v:.{digits}f}"
        energy = lv.get("energy") or {}
        lines.append(f"{lv['concurrency']:>4} {lv['completed']:>4} {f(lv['request_throughput_rps']):>7} "
                     f"{f(lv['output_throughput_tok_s']):>10} {f(lv['ttft_ms']['p50']):>9} {f(lv['ttft_ms']['p90']):>9} "
                     f"{f(lv['itl_ms']['p50']):>8} {f(lv['itl_ms']['p90']):>8} {f(lv['tpot_ms']['p50'], 2):>9} "
                     f"{f(lv['decode_tok_s_per_stream']):>9} {f(lv['e2e_ms']['p50']):>9} "
                     f"{f(energy.get('joules_per_output_token'), 3):>7} {f(energy.get('joules_per_request'), 2):>7}")
        if lv["errors"]:
            lines.append(f"     errors: {'; '.join(lv['errors'])}")
        if energy.get("available"):
            notes.append(f"  c={lv['concurrency']}: {f(energy.get('energy_j'), 1)} J over {energy['window_s']:.2f} s "
                         f"({energy['method']}; {energy['samples']} power samples every "
                         f"{f(energy.get('interval_s'), 3)} s, mean {f(energy.get('mean_power_w'))} W)")
        spec = lv.get("speculative")
        if spec:
            notes.append(f"  c={lv['concurrency']}: speculative decoding accepted {spec['draft_n_accepted']} of "
                         f"{spec['draft_n']} drafted tokens ({spec['acceptance_rate']:.1%})")
    lines.append("(latencies in ms; TPOT = time per output token after the first, decode/s = 1 / TPOT per stream: "
                 "out tok/s includes the first token's wait)")
    source = report.get("energy_source")
    if source and source != "off":
        lines.append(f"energy: {source}" + ("" if source != "not available" else
                                             " (no NVIDIA GPU, RAPL or hwmon power sensor readable here or in the "
                                             "gateway's /metrics)"))
    lines += notes
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- people (--users)

# Short questions people really type into a private assistant; the first message of a conversation is one of
# these, later ones are one of these or a follow-up on the reply (so conversations grow and get summarised).
QUESTIONS = (
    "What's a good way to start learning Python?",
    "Can you explain what a hash table is in two sentences?",
    "Give me three ideas for a quick weeknight dinner.",
    "How do I politely decline a meeting invitation?",
    "What is the difference between TCP and UDP?",
    "Summarise the plot of Romeo and Juliet in a few lines.",
    "How long should I boil an egg for a soft yolk?",
    "What does a mortgage pre-approval mean?",
    "Write a short haiku about autumn rain.",
    "Why is the sky blue?",
    "How can I make my laptop battery last longer?",
    "What are some tips for a first job interview?",
    "Explain what an API key is to someone who doesn't program.",
    "What should I pack for a weekend hiking trip?",
    "How do I convert Celsius to Fahrenheit in my head?",
    "Can you suggest a name for a small neighbourhood bakery?",
    "What is a good stretch for a stiff lower back?",
    "How do I write a polite reminder email about an unpaid invoice?",
)
FOLLOW_UPS = (
    "Can you say more about that?",
    "Thanks. Could you give me an example?",
    "Make that shorter, please.",
    "Why is that?",
    "And what would you do differently?",
)
FALLBACK_SOURCES = frozenset({"knowledge_base", "web_search"})
UNAVAILABLE_TEXT = "model is unavailable"  # the chat node's reply when no fallback could answer
READ_TIMEOUT_S = 120.0  # between two events of a reply (a waiting message hears its place every 5 s)
PAUSE_AFTER_FAILURE_S = 1.0  # a failing chat node is not hammered, even with --think-s 0
MAX_THINK_FACTOR = 5.0  # think times are capped at this many times the mean


class Refused(Exception):
    """The users mode cannot run as asked; the message says what to fix. `code`: the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclass
class MessageResult:
    """One message a simulated person sent, and what came back, as that person saw it."""

    person: int
    conversation: int  # the person's nth conversation
    index: int  # the message's place in that conversation (1-based)
    sent_at_s: float  # since the run began
    outcome: str = "failed"  # answered | unavailable | failed
    waited: bool = False
    http_status: int | None = None
    queued_events: int = 0
    retrying_events: int = 0
    max_position: int | None = None
    queue_wait_s: float | None = None  # done.message.meta.queue_wait_s
    first_token_s: float | None = None  # send → first `token` event
    reply_s: float | None = None  # send → `done`
    completion_tokens: int | None = None
    finish_reason: str | None = None
    source: str | None = None
    status: str | None = None
    detail: str = ""  # why it was unavailable (meta.model_error) or failed
    cut: bool = False  # still in flight when the drain limit passed


def classify(events: list[tuple[str, dict]]) -> dict:
    """What one reply stream (event name, data) amounts to: the MessageResult fields it decides."""
    queued = [data for name, data in events if name == "queued"]
    positions = [d["position"] for d in queued if isinstance(d.get("position"), int)]
    fields = {"queued_events": len(queued),
              "retrying_events": sum(1 for d in queued if d.get("reason") == "retrying"),
              "max_position": max(positions) if positions else None,
              "waited": bool(queued), "outcome": "failed"}
    cancelled = [data for name, data in events if name == "cancelled"]
    done = [data for name, data in events if name == "done"]
    if cancelled and not done:
        fields["detail"] = f"cancelled: {cancelled[-1].get('reason', '')}"[:200]
        return fields
    if not done:
        fields["detail"] = "the stream ended without a done event"
        return fields
    message = done[-1].get("message") or {}
    meta = message.get("meta") or {}
    wait = meta.get("queue_wait_s")
    if isinstance(wait, (int, float)) and not isinstance(wait, bool):
        fields["queue_wait_s"] = float(wait)
        fields["waited"] = fields["waited"] or wait > 0
    for key in ("completion_tokens", "finish_reason"):
        if meta.get(key) is not None:
            fields[key] = meta[key]
    source, status = message.get("source"), message.get("status")
    fields.update(source=source, status=status)
    content = message.get("content") or ""
    if source == "model" and status == "complete":
        fields["outcome"] = "answered"
    elif source in FALLBACK_SOURCES or UNAVAILABLE_TEXT in content.lower():
        fields["outcome"] = "unavailable"
        fields["detail"] = str(meta.get("model_error") or content)[:200]
    else:
        fields["detail"] = str(meta.get("error") or content or f"a {source}/{status} reply")[:200]
    return fields


def _stats(values: list[float]) -> dict:
    def r(v):
        return None if v is None else round(v, 3)
    return {"p50": r(percentile(values, 50)), "p95": r(percentile(values, 95)),
            "max": r(max(values)) if values else None, "n": len(values)}


def summarize_people(results: list[MessageResult], duration_s: float, wall_s: float) -> dict:
    """The counts and percentiles of a users run (or of one person's part of it)."""
    answered = [r for r in results if r.outcome == "answered"]
    waited = [r for r in results if r.waited]
    counts = {outcome: sum(1 for r in results if r.outcome == outcome) for outcome in ("answered", "unavailable", "failed")}

    def reasons(outcome: str) -> dict:
        tally: dict[str, int] = {}
        for r in results:
            if r.outcome == outcome:
                tally[r.detail] = tally.get(r.detail, 0) + 1
        return dict(sorted(tally.items(), key=lambda kv: -kv[1])[:10])

    return {
        "sent": len(results),
        **counts,
        "waited": len(waited),
        "cut": sum(1 for r in results if r.cut),
        "answered_per_min": round(counts["answered"] * 60 / duration_s, 2) if duration_s > 0 else None,
        "completion_tokens": sum(r.completion_tokens or 0 for r in answered),
        # over answered messages: the chat node's own wait, and what the person saw
        "wait_s": _stats([r.queue_wait_s for r in answered if r.queue_wait_s is not None]),
        "wait_of_waited_s": _stats([r.queue_wait_s for r in answered if r.waited and r.queue_wait_s is not None]),
        "first_token_s": _stats([r.first_token_s for r in answered if r.first_token_s is not None]),
        "reply_s": _stats([r.reply_s for r in answered if r.reply_s is not None]),
        "max_position": max((r.max_position for r in results if r.max_position is not None), default=None),
        "retrying_events": sum(r.retrying_events for r in results),
        "unavailable_reasons": reasons("unavailable"),
        "failure_reasons": reasons("failed"),
        "wall_s": round(wall_s, 3),
    }


async def reply_events(response: httpx.Response) -> AsyncIterator[tuple[str, dict]]:
    """(event, data) of the chat node's Server-Sent Events, as they arrive."""
    name, data = "message", []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    if data:
        yield name, json.loads("\n".join(data))


def _http_error(response: httpx.Response) -> str:
    try:
        body = response.json()
        text = body.get("error") if isinstance(body, dict) else None
        text = text.get("message", text) if isinstance(text, dict) else text
    except ValueError:
        text = None
    return f"HTTP {response.status_code}: {str(text or response.text)[:160]}"


def read_keys(path: str) -> list[str]:
    """One API key per line; blank lines and lines starting with # are skipped."""
    try:
        with open(path) as handle:
            return [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
    except OSError as exc:
        raise Refused(f"--keys {path}: {exc.strerror or exc}") from None


def pick_message(rng: random.Random, index: int) -> str:
    """The person's next message: a question to open a conversation, later a question or a follow-up."""
    if index > 0 and rng.random() < 0.4:
        return rng.choice(FOLLOW_UPS)
    return rng.choice(QUESTIONS)


def think_time(rng: random.Random, mean_s: float) -> float:
    """Exponentially distributed with mean `mean_s` (the usual closed-loop model of people), capped."""
    if mean_s <= 0:
        return 0.0
    return min(rng.expovariate(1 / mean_s), MAX_THINK_FACTOR * mean_s)


async def check_accounts(url: str, keys: list[str], verify, timeout) -> list[str]:
    """The account behind each key (GET /api/session); refuse keys that fail or that share an account."""
    names = []
    async with httpx.AsyncClient(base_url=url, verify=verify, timeout=timeout) as client:
        for n, key in enumerate(keys, 1):
            try:
                response = await client.get("/api/session", headers={"Authorization": f"Bearer {key}"})
            except httpx.HTTPError as exc:
                raise Refused(f"cannot reach the chat node at {url}: {exc.__class__.__name__}: {exc}", 1) from None
            if response.status_code == 401:
                raise Refused(f"key {n} of --keys is not accepted by {url} (401): revoked, mistyped or of another node")
            if response.status_code != 200:
                raise Refused(f"{url}/api/session answered {_http_error(response)}: is {url} a chat node?")
            names.append(response.json()["user"]["name"])
    shared = sorted({name for name in names if names.count(name) > 1})
    if shared:
        raise Refused(f"the keys of --keys belong to {len(set(names))} accounts for {len(keys)} people "
                      f"({', '.join(shared)} has several): fairness is per account, so give every person "
                      f"its own account's key")
    return names


async def chat_status(url: str, key: str, verify, timeout) -> dict:
    """The chat node's queue and gateway readiness (GET /api/status), or the error."""
    try:
        async with httpx.AsyncClient(base_url=url, verify=verify, timeout=timeout,
                                     headers={"Authorization": f"Bearer {key}"}) as client:
            response = await client.get("/api/status")
        if response.status_code != 200:
            return {"error": _http_error(response)}
        body = response.json()
        gateway = body.get("gateway") or {}
        return {"queue": body.get("queue"), "gateway_ready": gateway.get("ready"), "gateway_state": gateway.get("state")}
    except (httpx.HTTPError, ValueError) as exc:
        return {"error": f"{exc.__class__.__name__}: {exc}"[:200]}


async def bench_users(url: str, keys: list[str], *, users: int, duration_s: float, think_s: float = 5.0,
                      messages_per_conversation: int = 5, seed: int = 1, cacert: str | None = None,
                      drain_s: float = 120.0, progress=None) -> dict:
    """Run `users` simulated people against the chat node at `url` for `duration_s`; the report (see format_users_table)."""
    if len(keys) < users:
        raise Refused(f"--keys has {len(keys)} key(s) for {users} people: fairness is per account, so every "
                      f"person needs its own account's key (clawbot users add NAME; clawbot users add-key NAME)")
    keys = keys[:users]
    url = url.rstrip("/")
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=cacert) if cacert else True
    timeout = httpx.Timeout(30, read=READ_TIMEOUT_S)
    accounts = await check_accounts(url, keys, verify, timeout)
    before = await chat_status(url, keys[0], verify, timeout)
    results: list[MessageResult] = []
    started_at, t0 = time.time(), time.monotonic()
    deadline, cut_at = t0 + duration_s, t0 + duration_s + drain_s

    async def pause(seconds: float) -> None:
        await asyncio.sleep(max(0.0, min(seconds, deadline - time.monotonic())))

    async def send(client: httpx.AsyncClient, conversation_id: str, content: str, result: MessageResult) -> None:
        events: list[tuple[str, dict]] = []
        sent = time.monotonic()
        error = ""
        try:
            async with asyncio.timeout(max(0.0, cut_at - sent)):
                async with client.stream("POST", f"/api/conversations/{conversation_id}/messages",
                                         json={"content": content}) as response:
                    result.http_status = response.status_code
                    if response.status_code != 200:
                        await response.aread()
                        error = _http_error(response)
                    else:
                        async for name, data in reply_events(response):
                            now = time.monotonic()
                            if name == "token" and result.first_token_s is None:
                                result.first_token_s = round(now - sent, 3)
                            if name in ("done", "cancelled"):
                                result.reply_s = round(now - sent, 3)
                            events.append((name, data))
        except TimeoutError:
            result.cut = True
            error = f"still in flight {drain_s:g} s after the duration: cut"
        except (httpx.HTTPError, ValueError) as exc:
            if not any(name == "done" for name, _ in events):  # a reply already complete stays complete
                error = f"broken stream: {exc.__class__.__name__}: {exc}"[:200]
        for key, value in classify(events).items():
            setattr(result, key, value)
        if error:
            result.outcome, result.detail = "failed", error

    async def person(number: int, key: str) -> None:
        rng = random.Random(f"clawbot-bench/{seed}/{number}")
        async with httpx.AsyncClient(base_url=url, verify=verify, timeout=timeout,
                                     headers={"Authorization": f"Bearer {key}"}) as client:
            await pause(rng.uniform(0, think_s))  # people do not all arrive at the same instant
            conversation, count, in_conversation = None, 0, 0
            while time.monotonic() < deadline:
                content = pick_message(rng, 0 if conversation is None else in_conversation)
                think = think_time(rng, think_s)  # drawn before the outcome is known: the same sequence every run
                result = MessageResult(person=number, conversation=count + (conversation is None), index=1,
                                       sent_at_s=round(time.monotonic() - t0, 3))
                if conversation is None:
                    try:
                        async with asyncio.timeout(max(0.0, cut_at - time.monotonic())):
                            response = await client.post("/api/conversations", json={})
                        if response.status_code == 201:
                            conversation, count, in_conversation = response.json()["id"], count + 1, 0
                        else:
                            result.detail = f"creating a conversation: {_http_error(response)}"
                    except (httpx.HTTPError, TimeoutError, ValueError, KeyError) as exc:
                        result.detail = f"creating a conversation: {exc.__class__.__name__}: {exc}"[:200]
                if conversation is not None:
                    result.index = in_conversation + 1
                    await send(client, conversation, content, result)
                    in_conversation += 1
                    if in_conversation >= messages_per_conversation:
                        conversation = None
                results.append(result)
                if progress:
                    progress(result)
                await pause(max(think, PAUSE_AFTER_FAILURE_S if result.outcome == "failed" else 0.0))

    await asyncio.gather(*(person(n, key) for n, key in enumerate(keys, 1)))
    wall = time.monotonic() - t0
    after = await chat_status(url, keys[0], verify, timeout)
    results.sort(key=lambda r: r.sent_at_s)
    people = []
    for n, name in enumerate(accounts, 1):
        mine = [r for r in results if r.person == n]
        people.append({"person": n, "account": name, **summarize_people(mine, duration_s, wall)})
    return {
        "mode": "users", "url": url, "users": users, "duration_s": duration_s, "think_s": think_s,
        "messages_per_conversation": messages_per_conversation, "seed": seed, "drain_s": drain_s,
        "started_at": round(started_at, 3),  # wall clock (time.time()) of sent_at_s = 0
        "status_before": before, "status_after": after,
        "summary": summarize_people(results, duration_s, wall), "people": people,
        "messages": [asdict(r) for r in results],
    }


def format_users_table(report: dict) -> str:
    def f(v):
        return "-" if v is None else f"{v:.2f}"

    head = (f"{'':<10} {'sent':>5} {'answered':>8} {'waited':>6} {'unavail':>7} {'failed':>6} "
            f"{'wait p50':>8} {'wait p95':>8} {'first p50':>9} {'first p95':>9} {'reply p50':>9} {'reply p95':>9}")
    s = report["summary"]
    queue = (report.get("status_before") or {}).get("queue") or {}
    lines = [f"{report['url']}  {report['users']} people for {report['duration_s']:g} s, think ≈{report['think_s']:g} s, "
             f"{report['messages_per_conversation']} messages per conversation, seed {report['seed']}"
             + (f"; chat node slots {queue['capacity']}" if queue.get("capacity") else ""), head]

    def row(label: str, part: dict) -> str:
        return (f"{label:<10} {part['sent']:>5} {part['answered']:>8} {part['waited']:>6} {part['unavailable']:>7} "
                f"{part['failed']:>6} {f(part['wait_s']['p50']):>8} {f(part['wait_s']['p95']):>8} "
                f"{f(part['first_token_s']['p50']):>9} {f(part['first_token_s']['p95']):>9} "
                f"{f(part['reply_s']['p50']):>9} {f(part['reply_s']['p95']):>9}")

    lines.append(row("all", s))
    for person in report["people"]:
        lines.append(row(person["account"][:10], person))
    lines.append(f"(times in s over answered messages; wait = the chat node's queue_wait_s, first = send → first token, "
                 f"reply = send → done; {s['answered_per_min']} answered/min, longest line position "
                 f"{s['max_position'] if s['max_position'] is not None else '-'}, wall {s['wall_s']:.1f} s)")
    for title, reasons in (("unavailable", s["unavailable_reasons"]), ("failed", s["failure_reasons"])):
        for reason, count in reasons.items():
            lines.append(f"  {title} {count}x: {reason}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Measure an OpenAI-compatible endpoint at fixed concurrency levels (default), or, with "
                          "--users N, a chat node used by N simulated people (conversations, think time).")
    parser.add_argument("url", help="base URL: a gateway (https://model-node:5000) or a model server "
                        "(http://127.0.0.1:8081); with --users, a chat node (https://chat-node:8443)")
    parser.add_argument("--cacert", help="CA certificate to trust (the cluster CA: deploy prints its path)")
    parser.add_argument("--json", dest="json_out", metavar="FILE", help="write the full report here")
    fixed = parser.add_argument_group("fixed concurrency (the default mode)")
    fixed.add_argument("--concurrency", default="1,2,4,8", help="comma-separated levels (default 1,2,4,8)")
    fixed.add_argument("--requests", type=int, default=16, help="requests per level (default 16)")
    fixed.add_argument("--prompt-tokens", type=int, default=128,
                       help="prompt size, calibrated with the server's tokenizer where it has one (default 128)")
    fixed.add_argument("--max-tokens", type=int, default=128, help="tokens to generate per request (default 128)")
    fixed.add_argument("--model", default=None, help="model name to send (default: none, the server's own)")
    fixed.add_argument("--no-ignore-eos", action="store_true", help="let generation stop at EOS")
    fixed.add_argument("--cert", help="client certificate (the gateway's mTLS)")
    fixed.add_argument("--key", help="the client certificate's private key")
    fixed.add_argument("--api-key-file", help="bearer key for a model server measured directly (the agent "
                       "writes it to STATE_DIR/model-server.key)")
    fixed.add_argument("--energy", choices=["auto", "local", "metrics", "off"], default="auto",
                       help="joules per token from this machine's sensors (local: NVIDIA GPUs, RAPL, hwmon) or the "
                            "gateway's /metrics (metrics); auto: local when this machine has a sensor, else the "
                            "gateway's; none: 'not available' (default auto)")
    fixed.add_argument("--sample-interval", type=float, default=ENERGY_SAMPLE_INTERVAL_S, metavar="S",
                       help=f"seconds between power samples (default {ENERGY_SAMPLE_INTERVAL_S})")
    people = parser.add_argument_group("people (--users): the chat node's conversation API, as people use it")
    people.add_argument("--users", type=int, metavar="N", help="simulated people; switches to this mode")
    people.add_argument("--duration", type=float, default=60.0, metavar="S",
                        help="seconds during which people send messages (default 60)")
    people.add_argument("--keys", metavar="FILE", help="API keys, one per line, one account per person "
                        "(`clawbot users add-key NAME`); fewer keys than people, or two keys of one account, is refused")
    people.add_argument("--think-s", type=float, default=5.0, metavar="S",
                        help="mean pause between reading a reply and sending the next message; exponentially "
                             "distributed, capped at 5x (default 5)")
    people.add_argument("--messages-per-conversation", type=int, default=5, metavar="N",
                        help="a person starts a new conversation after this many messages (default 5)")
    people.add_argument("--seed", type=int, default=1,
                        help="seed of the questions and think times (same seed, same sequence per person; default 1)")
    people.add_argument("--drain-s", type=float, default=120.0, metavar="S",
                        help="after --duration, how long messages in flight may finish before they are cut and "
                             "counted as failed (default 120)")


def run(args: argparse.Namespace) -> int:
    if args.users is not None:
        return run_users(args)
    try:
        levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        print(f"clawbot bench: --concurrency must be integers like 1,2,4 (got {args.concurrency!r})", file=sys.stderr)
        return 2
    report = asyncio.run(bench(args.url, concurrency=levels, requests=args.requests, prompt_tokens=args.prompt_tokens,
                               max_tokens=args.max_tokens, model=args.model, cacert=args.cacert, cert=args.cert,
                               key=args.key, ignore_eos=not args.no_ignore_eos,
                               api_key=open(args.api_key_file).read().strip() if args.api_key_file else None,
                               energy=args.energy, sample_interval_s=args.sample_interval))
    print(format_table(report))
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0 if all(lv["failed"] == 0 for lv in report["levels"]) else 1


def run_users(args: argparse.Namespace) -> int:
    """`clawbot bench --users N`: exit 0 when no message failed, 1 when some did, 2 when refused."""
    problems = []
    if args.users < 1:
        problems.append("--users must be at least 1")
    if not args.keys:
        problems.append("--users needs --keys FILE (one API key per person)")
    if not args.duration > 0 or not math.isfinite(args.duration):
        problems.append("--duration must be a positive number of seconds")
    if args.think_s < 0 or args.drain_s < 0:
        problems.append("--think-s and --drain-s cannot be negative")
    if args.messages_per_conversation < 1:
        problems.append("--messages-per-conversation must be at least 1")
    if problems:
        print("clawbot bench: " + "; ".join(problems), file=sys.stderr)
        return 2
    try:
        keys = read_keys(args.keys)
        report = asyncio.run(bench_users(args.url, keys, users=args.users, duration_s=args.duration,
                                         think_s=args.think_s, messages_per_conversation=args.messages_per_conversation,
                                         seed=args.seed, cacert=args.cacert, drain_s=args.drain_s))
    except Refused as exc:
        print(f"clawbot bench: {exc}", file=sys.stderr)
        return exc.code
    print(format_users_table(report))
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(report, handle, indent=2)
    return 1 if report["summary"]["failed"] else 0


def report_dict(results: list[RequestResult]) -> list[dict]:  # for tests and the benchmark script
    return [asdict(r) for r in results]
