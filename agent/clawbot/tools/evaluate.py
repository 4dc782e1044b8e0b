"""`clawbot eval`: does a model still answer well? Two checks, each against clawbot.json's `quality_gate`.

Smoke set (`clawbot eval URL`): short prompts with answers a script can check (facts, a sequence, arithmetic,
output formats: capitals, a list, JSON) and one prompt longer than the context window, which the server must
refuse with 400 rather than cut or answer. Sent to any OpenAI-compatible URL: a gateway (mTLS: --cacert, --cert,
--key), a chat node's /v1 or a model server (an API key), greedy (temperature 0) so a run repeats. Reported as a
pass rate. The set ships in clawbot/tools/data/smoke.json.

Distribution (`--model-file CANDIDATE --reference REFERENCE`): the vendored `llama-perplexity` scores a fixed text
(clawbot/tools/data/eval-text.txt, written for clawbot) with the reference model and saves its token
distributions (`--kl-divergence-base`), then scores the same tokens with the candidate (`--kl-divergence`): the
mean KL divergence of the candidate's next-token distribution from the reference's, how often both rank the same
token first (llama-perplexity's "Same top p"), and the perplexity of both. A truncated file, one of another
vocabulary or one that yields NaN fails with the reason.

Exit status: 0 every check passed, 1 a check failed (the table says which, with the numbers), 2 a usage error,
an unreadable file or an invalid clawbot.json (file:line:col), or a missing tool.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

DEFAULT_CTX = 256  # tokens per chunk: llama-perplexity scores the second half of each
DEFAULT_CHUNKS = 6  # 6 x 127 scored tokens; the shipped text has enough for this with any tokenizer seen here
DEFAULT_TIMEOUT_S = 120.0
TOOL_TIMEOUT_S = 3600
GATE_KEYS = ("min_smoke_pass_rate", "max_mean_kld", "min_top1_agreement", "max_perplexity_increase")
KINDS = ("completion", "chat", "overlong")


class EvalError(Exception):
    """A usage problem, an unreadable or invalid input, or a missing tool: exit 2 with this message."""


def data_file(name: str) -> Path:
    """A file shipped in clawbot/tools/data/."""
    return Path(str(resources.files("clawbot.tools").joinpath("data", name)))


def eval_text() -> Path:
    return data_file("eval-text.txt")


# --------------------------------------------------------------------------- thresholds


def gate_thresholds(config_path: str | None = None) -> dict:
    """clawbot.json's quality_gate (the schema's defaults without a file), checked as `clawbot validate` checks it."""
    from clawbot.common import config as configuration

    if config_path is None:
        return dict(configuration.defaults()["quality_gate"])
    try:
        result = configuration.check_file(config_path)
    except configuration.UnreadableFile as exc:
        raise EvalError(str(exc)) from None
    if not result.ok:
        raise EvalError("invalid config:\n" + "\n".join(d.text() for d in result.diagnostics if d.severity == "error"))
    return dict(result.config["quality_gate"])


@dataclass
class Check:
    """One threshold of the gate against what was measured."""

    name: str
    threshold: str  # the quality_gate key
    value: float | None
    limit: float
    passed: bool
    detail: str = ""


# --------------------------------------------------------------------------- the smoke set


@dataclass
class SmokeItem:
    id: str
    kind: str
    what: str = ""
    prompt: str = ""
    messages: list = field(default_factory=list)
    stop: list = field(default_factory=list)
    max_tokens: int = 16
    expect: str = ""
    json: dict | None = None


def load_smoke_set(path: str | Path | None = None) -> list[SmokeItem]:
    """The smoke set (the shipped one by default), every item checked; errors name the file and the item."""
    path = Path(path) if path else data_file("smoke.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EvalError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise EvalError(f"{path}: not JSON: {exc}") from None
    items = data.get("items") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise EvalError(f"{path}: needs an object with a non-empty list `items`")
    known = {f for f in SmokeItem.__dataclass_fields__}
    out, seen = [], set()
    for index, raw in enumerate(items):
        where = f"{path}: items/{index}"
        if not isinstance(raw, dict):
            raise EvalError(f"{where}: not an object")
        unknown = sorted(set(raw) - known)
        if unknown:
            raise EvalError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        try:
            item = SmokeItem(**raw)
        except TypeError as exc:
            raise EvalError(f"{where}: {exc}") from None
        where = f"{path}: items/{index} ({item.id})"
        if not isinstance(item.id, str) or not item.id or item.id in seen:
            raise EvalError(f"{where}: `id` must be a unique non-empty string")
        seen.add(item.id)
        if item.kind not in KINDS:
            raise EvalError(f"{where}: `kind` must be one of {', '.join(KINDS)}, not {item.kind!r}")
        if item.kind == "completion" and not (isinstance(item.prompt, str) and item.prompt):
            raise EvalError(f"{where}: a completion needs a non-empty `prompt`")
        if item.kind == "chat" and not (isinstance(item.messages, list) and item.messages):
            raise EvalError(f"{where}: a chat needs `messages`")
        if item.kind != "overlong":
            if bool(item.expect) == bool(item.json):
                raise EvalError(f"{where}: give exactly one of `expect` (a regular expression) or `json`")
            if item.expect:
                try:
                    re.compile(item.expect)
                except re.error as exc:
                    raise EvalError(f"{where}: `expect` is not a regular expression: {exc}") from None
            if item.json is not None and not (isinstance(item.json, dict) and set(item.json) == {"key", "value"}):
                raise EvalError(f"{where}: `json` must be {{\"key\": ..., \"value\": ...}}")
            if not isinstance(item.max_tokens, int) or not 1 <= item.max_tokens <= 256:
                raise EvalError(f"{where}: `max_tokens` must be an integer from 1 to 256")
        out.append(item)
    return out


@dataclass
class SmokeResult:
    id: str
    kind: str
    what: str
    passed: bool
    answer: str
    detail: str
    seconds: float


def first_json_object(text: str):
    """The first {...} in text that parses as a JSON object, or None."""
    decoder = json.JSONDecoder()
    for start in (i for i, c in enumerate(text) if c == "{"):
        try:
            value, _ = decoder.raw_decode(text[start:])
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def judge(item: SmokeItem, answer: str) -> tuple[bool, str]:
    """Whether an answer passes its item, and why not."""
    if item.json is not None:
        value = first_json_object(answer)
        if value is None:
            return False, "no JSON object in the answer"
        key, wanted = item.json["key"], item.json["value"]
        if key not in value:
            return False, f"the JSON object has no key {key!r}"
        if value[key] != wanted:
            return False, f"{key} is {value[key]!r}, not {wanted!r}"
        return True, ""
    if re.search(item.expect, answer):
        return True, ""
    return False, f"does not match {item.expect}"


def client_for(cacert: str | None = None, cert: str | None = None, key: str | None = None,
               api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S):
    import ssl

    import httpx

    verify: ssl.SSLContext | bool = True
    try:
        if cacert or cert:
            verify = ssl.create_default_context(cafile=cacert)
            if cert:
                verify.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise EvalError(f"cannot load the TLS files (--cacert {cacert}, --cert {cert}, --key {key}): {exc}") from None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(verify=verify, headers=headers, timeout=httpx.Timeout(timeout, connect=10))


def base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def context_window(client, url: str) -> int | None:
    """The served context window: the gateway's (and a chat node's) /v1/models meta.context_window, else
    llama-server's per-slot n_ctx from /props."""
    try:
        r = client.get(f"{url}/v1/models")
        if r.status_code == 200:
            for model in r.json().get("data") or []:
                value = (model.get("meta") or {}).get("context_window")
                if isinstance(value, int) and value > 0:
                    return value
    except Exception:  # noqa: BLE001 - a server without this answer is asked the next way
        pass
    try:
        r = client.get(f"{url}/props")
        if r.status_code == 200:
            value = (r.json().get("default_generation_settings") or {}).get("n_ctx")
            if isinstance(value, int) and value > 0:
                return value
    except Exception:  # noqa: BLE001
        pass
    return None


def _error_message(response) -> str:
    try:
        error = response.json().get("error")
        return str(error.get("message") if isinstance(error, dict) else error)[:300]
    except (ValueError, AttributeError):
        return response.text[:300]


def run_item(client, url: str, item: SmokeItem, model: str | None, ctx: int | None) -> SmokeResult:
    import httpx

    started = time.monotonic()

    def result(passed: bool, answer: str, detail: str) -> SmokeResult:
        return SmokeResult(item.id, item.kind, item.what, passed, answer, detail, round(time.monotonic() - started, 3))

    try:
        if item.kind == "overlong":
            if not ctx:
                return result(False, "", "the server does not say its context window: pass --context-window N")
            body = {"prompt": "hello " * (2 * ctx + 16), "max_tokens": 1, "temperature": 0}
            if model:
                body["model"] = model
            r = client.post(f"{url}/v1/completions", json=body)
            if r.status_code in (400, 413):
                return result(True, "", f"refused with {r.status_code}: {_error_message(r)}")
            if r.status_code == 200:
                return result(False, "", f"answered a prompt of about {2 * ctx} words with a context window of {ctx}: "
                                         "it was cut or ignored instead of refused")
            return result(False, "", f"answered {r.status_code} ({_error_message(r)}), not 400")
        body = {"max_tokens": item.max_tokens, "temperature": 0, "seed": 1}
        if item.stop:
            body["stop"] = item.stop
        if model:
            body["model"] = model
        if item.kind == "completion":
            r = client.post(f"{url}/v1/completions", json={**body, "prompt": item.prompt})
        else:
            r = client.post(f"{url}/v1/chat/completions", json={**body, "messages": item.messages})
        if r.status_code != 200:
            return result(False, "", f"HTTP {r.status_code}: {_error_message(r)}")
        choice = r.json()["choices"][0]
        answer = choice["text"] if item.kind == "completion" else (choice["message"].get("content") or "")
    except httpx.HTTPError as exc:
        return result(False, "", f"request failed: {type(exc).__name__}: {exc}")
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return result(False, "", f"not an OpenAI answer: {exc}")
    passed, detail = judge(item, answer)
    return result(passed, answer, detail)


def smoke(url: str, items: list[SmokeItem] | None = None, *, cacert: str | None = None, cert: str | None = None,
          key: str | None = None, api_key: str | None = None, model: str | None = None,
          context: int | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """Run the smoke set against an OpenAI-compatible base URL; {"url", "context_window", "results", "passed",
    "total", "pass_rate"}."""
    items = items if items is not None else load_smoke_set()
    url = base_url(url)
    with client_for(cacert, cert, key, api_key, timeout) as client:
        ctx = context or context_window(client, url)
        results = [run_item(client, url, item, model, ctx) for item in items]
    passed = sum(r.passed for r in results)
    return {"url": url, "context_window": ctx, "results": [asdict(r) for r in results], "passed": passed,
            "total": len(results), "pass_rate": passed / len(results)}


# --------------------------------------------------------------------------- the distribution check

_NUM = r"([-+]?(?:nan|inf|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?))"
# the lines of llama-perplexity's kl_divergence() summary (tools/perplexity/perplexity.cpp), "±" or "+/-"
_PM = r"\s*(?:±|\+/-)\s*"
KLD_LINES = {  # name: (the line as llama-perplexity prints it, its pattern)
    "ppl_candidate": ("Mean PPL(Q)", r"^Mean PPL\(Q\)\s*:\s*" + _NUM + _PM + _NUM),
    "ppl_reference": ("Mean PPL(base)", r"^Mean PPL\(base\)\s*:\s*" + _NUM + _PM + _NUM),
    "ln_ppl_ratio": ("Mean ln(PPL(Q)/PPL(base))", r"^Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*" + _NUM + _PM + _NUM),
    "ppl_ratio": ("Mean PPL(Q)/PPL(base)", r"^Mean PPL\(Q\)/PPL\(base\)\s*:\s*" + _NUM + _PM + _NUM),
    "mean_kld": ("Mean    KLD", r"^Mean\s+KLD:\s*" + _NUM + _PM + _NUM),
    "kld_p99": ("99.0%   KLD", r"^99\.0%\s+KLD:\s*" + _NUM),
    "kld_max": ("Maximum KLD", r"^Maximum KLD:\s*" + _NUM),
    "rms_dp": ("RMS Δp", r"^RMS Δp\s*:\s*" + _NUM + _PM + _NUM + r"\s*%"),
    "same_top": ("Same top p", r"^Same top p:\s*" + _NUM + _PM + _NUM + r"\s*%"),
}
KLD_PATTERNS = {name: re.compile(pattern, re.M | re.I) for name, (_, pattern) in KLD_LINES.items()}
CHUNKS_LINE = re.compile(r"computing over (\d+) chunks, n_ctx=(\d+)")
TOO_FEW_TOKENS = re.compile(r"tokenizes to only (\d+) tokens")
LOG_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ [A-Z] (?:\w+\s+)?")  # llama.cpp's log line prefix (time, level, module)


def _float(text: str) -> float:
    return float(text.lower().replace("-nan", "nan"))


def parse_kld_output(text: str) -> dict:
    """llama-perplexity --kl-divergence's summary as numbers (fractions, not percent); raises ValueError naming the
    line it could not find (llama-perplexity prints no summary for fewer than 100 scored tokens)."""
    out: dict = {}
    for name, pattern in KLD_PATTERNS.items():
        match = pattern.search(text)
        if match is None:
            raise ValueError(f"llama-perplexity printed no '{KLD_LINES[name][0]}' line")
        value = _float(match.group(1))
        out[name] = value / 100 if name in ("rms_dp", "same_top") else value
        if name in ("mean_kld", "same_top", "ppl_ratio"):
            uncertainty = _float(match.group(2))
            out[f"{name}_uncertainty"] = uncertainty / 100 if name == "same_top" else uncertainty
    chunks = CHUNKS_LINE.search(text)
    if chunks:
        out["chunks"], out["ctx"] = int(chunks.group(1)), int(chunks.group(2))
        out["tokens"] = out["chunks"] * (out["ctx"] - 1 - out["ctx"] // 2)
    return out


def _tool_failure(model: Path, text: str) -> str:
    """The lines of a tool's output that say why it failed."""
    lines = [LOG_PREFIX.sub("", line.strip()) for line in text.splitlines() if line.strip()]
    too_few = TOO_FEW_TOKENS.search(text)
    if too_few:
        return (f"the text tokenizes to only {too_few.group(1)} tokens with {model.name}: llama-perplexity needs at "
                "least 2 x --ctx (pass a longer --text, or a smaller --ctx / --chunks)")
    reason = [line for line in lines if re.search(r"error loading model|inconsistent|not enough|does not look like",
                                                       line, re.I)]
    if reason:  # the line that says why; the ones after it only say that loading failed
        return reason[0][:1000]
    wanted = [line for line in lines if re.search(r"error|failed|unable|invalid", line, re.I)]
    return "; ".join(dict.fromkeys(wanted[-4:]))[:1000]  # "": no reason printed (or it was lost at exit)


NO_REASON = "no reason printed (llama.cpp's logger can lose its last lines at exit)"


def find_perplexity_tool(name: str = "llama-perplexity") -> Path:
    from clawbot.model.engines import build as engine

    tool = engine.find_tool(name)
    if tool is None:
        raise EvalError(f"{name} is not built: run `clawbot build-engine` (it builds llama-server and the llama.cpp "
                        "tools beside it from the pinned sources)")
    return tool


def _run_tool(argv: list[str], timeout: int = TOOL_TIMEOUT_S) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise EvalError(f"{Path(argv[0]).name} ran longer than {timeout} s: {' '.join(argv)}") from None


@dataclass
class Distribution:
    """What llama-perplexity measured for a candidate against a reference (fractions, not percent)."""

    candidate: str
    reference: str
    text: str
    ctx: int
    chunks: int
    tokens: int = 0
    mean_kld: float | None = None
    mean_kld_uncertainty: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    top1_agreement: float | None = None
    top1_agreement_uncertainty: float | None = None
    rms_dp: float | None = None
    ppl_reference: float | None = None
    ppl_candidate: float | None = None
    ppl_ratio: float | None = None
    seconds: float = 0.0
    runs: int = 0  # candidate runs of llama-perplexity it took to get its summary (SUMMARY_ATTEMPTS)
    error: str = ""

    @property
    def perplexity_increase(self) -> float | None:
        return None if self.ppl_ratio is None else self.ppl_ratio - 1


def _check_gguf(path: Path, role: str) -> None:
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise EvalError(f"{role} {path}: cannot read: {exc.strerror or exc}") from None
    if magic != b"GGUF":
        raise EvalError(f"{role} {path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")


def gguf_problem(path: Path) -> str:
    """Why a GGUF cannot be a whole model ("" when its header reads and its tensors fit in the file): a download
    cut short says so here, before llama.cpp is asked (whose reason can be lost, see SUMMARY_ATTEMPTS)."""
    from clawbot.common.sizing import read_gguf_header

    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                return f"{path.name} is not a GGUF file"
        header = read_gguf_header(path)
    except OSError as exc:
        return f"{path.name} cannot be read: {exc.strerror or exc}"
    except Exception as exc:  # noqa: BLE001 - struct.error, ValueError, IndexError of a broken header
        return f"{path.name} has no readable GGUF header ({type(exc).__name__}: {exc}): a download cut short?"
    end = header.data_offset + max((t.offset + t.n_bytes for t in header.tensors), default=0)
    if header.file_bytes < end:
        return (f"{path.name} is truncated: {header.file_bytes} bytes, but its tensors end at byte {end} (a download "
                "or copy cut short)")
    return ""


def logits_header(logits: Path) -> tuple[int, int, int] | None:
    """(n_ctx, n_vocab, n_chunk) of a --kl-divergence-base file, or None when it is not one or is incomplete.

    The file (perplexity.cpp's perplexity()): "_logits_", int32 n_ctx, int32 n_vocab, int32 n_chunk, the
    n_chunk * n_ctx int32 tokens, then per chunk the n_ctx - 1 - n_ctx/2 scored tokens' log-probabilities, each
    2 * ((n_vocab + 1) / 2) + 4 uint16. Written through a stream that is closed before the tool exits, so its
    size says whether it is complete."""
    try:
        size = logits.stat().st_size
        with open(logits, "rb") as handle:
            head = handle.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:8] != b"_logits_":
        return None
    n_ctx, n_vocab, n_chunk = (int.from_bytes(head[i:i + 4], "little", signed=True) for i in (8, 12, 16))
    if min(n_ctx, n_vocab, n_chunk) <= 0:
        return None
    scored = n_ctx - 1 - n_ctx // 2
    expected = 20 + 4 * n_chunk * n_ctx + 2 * (2 * ((n_vocab + 1) // 2) + 4) * scored * n_chunk
    return (n_ctx, n_vocab, n_chunk) if size == expected else None


# llama.cpp's logger writes from a thread that the tool does not wait for at exit: the last lines, the summary
# among them, are sometimes lost (common/log.cpp, "this design may cause logs to be lost if not flushed before
# the program exits"; ggml-org/llama.cpp#22142). Seen here in about 1 of 8 runs on a small model, none on the demo
# model; a run that exits 0 without its summary is run again.
SUMMARY_ATTEMPTS = 4


def save_reference(reference: Path, text: Path, logits: Path, *, ctx: int = DEFAULT_CTX,
                   chunks: int = DEFAULT_CHUNKS, threads: int | None = None, tool: Path | None = None) -> tuple:
    """Score `text` with the reference and save its token distributions to `logits`; returns the file's
    (n_ctx, n_vocab, n_chunk). Raises EvalError when the reference cannot be measured (it is not the candidate
    that is wrong then)."""
    tool = tool or find_perplexity_tool()
    problem = gguf_problem(reference)
    if problem:
        raise EvalError(f"cannot measure the reference: {problem}")
    batch = ctx * max(1, min(chunks, 2048 // ctx))  # llama-perplexity's default batch, in whole chunks
    argv = [str(tool), "-m", str(reference), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks),
            "-b", str(batch), "-t", str(threads or os.cpu_count() or 1), "--kl-divergence-base", str(logits)]
    for attempt in range(1, SUMMARY_ATTEMPTS + 1):
        done = _run_tool(argv)
        header = logits_header(logits)
        if done.returncode == 0 and header is not None:
            break
        why = _tool_failure(reference, done.stdout + done.stderr)
        if why or attempt == SUMMARY_ATTEMPTS:  # else the reason was lost at exit: ask again
            raise EvalError(f"cannot measure the reference {reference} (exit {done.returncode}, no complete "
                            f"--kl-divergence-base file): {why or NO_REASON}")
    scored = header[2] * (header[0] - 1 - header[0] // 2)
    if scored < 100:
        raise EvalError(f"{text} gives only {header[2]} chunk(s) of {header[0]} tokens with {reference.name}, "
                        f"{scored} scored tokens; llama-perplexity summarises 100 or more: pass a longer --text or a "
                        "smaller --ctx")
    return header


def compare(candidate: Path, logits: Path, *, threads: int | None = None, tool: Path | None = None) -> dict:
    """The candidate scored on the reference's saved tokens: parse_kld_output's numbers, or {"error": why}."""
    tool = tool or find_perplexity_tool()
    argv = [str(tool), "-m", str(candidate), "--kl-divergence-base", str(logits), "--kl-divergence",
            "-t", str(threads or os.cpu_count() or 1)]
    header = logits_header(logits)
    if header:
        argv += ["-c", str(header[0])]
    problem = gguf_problem(candidate)
    if problem:
        return {"error": problem}
    for attempt in range(1, SUMMARY_ATTEMPTS + 1):
        done = _run_tool(argv)
        text = done.stdout + done.stderr
        if done.returncode != 0:
            why = _tool_failure(candidate, text)
            if not why and attempt < SUMMARY_ATTEMPTS:
                continue  # the reason was lost with the logger's last lines: ask again
            return {"error": f"llama-perplexity cannot score {candidate.name} (exit {done.returncode}): "
                             f"{why or NO_REASON}"}
        try:
            parsed = parse_kld_output(text)
        except ValueError as exc:
            if attempt < SUMMARY_ATTEMPTS:
                continue
            why = _tool_failure(candidate, text)
            return {"error": f"{exc} for {candidate.name} in {SUMMARY_ATTEMPTS} runs that exited 0"
                             + (f": {why}" if why else " (llama.cpp's logger can lose its last lines at exit)")}
        if header:
            parsed["ctx"], parsed["chunks"] = header[0], header[2]
            parsed["tokens"] = header[2] * (header[0] - 1 - header[0] // 2)
        parsed["attempts"] = attempt
        return parsed
    raise AssertionError("unreachable")


def distribution_check(candidate: str | Path, reference: str | Path, text: str | Path | None = None, *,
                       ctx: int = DEFAULT_CTX, chunks: int = DEFAULT_CHUNKS, threads: int | None = None,
                       work_dir: str | Path | None = None, log=None) -> Distribution:
    """Measure `candidate` against `reference` on `text` (the shipped text by default).

    A candidate llama-perplexity cannot score (truncated, another vocabulary) gives a Distribution with `error`;
    an unreadable input, a reference that cannot be measured or a missing tool raise EvalError."""
    candidate, reference = Path(candidate), Path(reference)
    text = Path(text) if text else eval_text()
    _check_gguf(reference, "reference")
    if not candidate.is_file():
        raise EvalError(f"candidate {candidate}: no such file")
    if not text.is_file():
        raise EvalError(f"text {text}: no such file")
    if ctx < 16 or chunks < 1:
        raise EvalError("--ctx must be at least 16 and --chunks at least 1")
    if chunks * (ctx - 1 - ctx // 2) < 100:
        raise EvalError(f"--chunks {chunks} x --ctx {ctx} scores {chunks * (ctx - 1 - ctx // 2)} tokens; "
                        "llama-perplexity summarises only 100 or more: raise --chunks or --ctx")
    tool = find_perplexity_tool()
    result = Distribution(str(candidate), str(reference), str(text), ctx, chunks)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="clawbot-eval-", dir=work_dir) as scratch:
        logits = Path(scratch) / "reference.kld"
        if log:
            log(f"scoring the text with the reference {reference.name} ({chunks} chunks of {ctx} tokens)")
        save_reference(reference, text, logits, ctx=ctx, chunks=chunks, threads=threads, tool=tool)
        if log:
            log(f"scoring the same tokens with the candidate {candidate.name}")
        measured = compare(candidate, logits, threads=threads, tool=tool)
    result.seconds = round(time.monotonic() - started, 2)
    if "error" in measured:
        result.error = measured["error"]
        return result
    result.tokens, result.runs = measured.get("tokens", 0), measured.get("attempts", 1)
    result.mean_kld = measured["mean_kld"]
    result.mean_kld_uncertainty = measured["mean_kld_uncertainty"]
    result.kld_p99, result.kld_max = measured["kld_p99"], measured["kld_max"]
    result.top1_agreement = measured["same_top"]
    result.top1_agreement_uncertainty = measured["same_top_uncertainty"]
    result.rms_dp = measured["rms_dp"]
    result.ppl_candidate, result.ppl_reference = measured["ppl_candidate"], measured["ppl_reference"]
    result.ppl_ratio = measured["ppl_ratio"]
    numbers = (result.mean_kld, result.top1_agreement, result.ppl_candidate, result.ppl_ratio)
    if not all(math.isfinite(v) for v in numbers):
        result.error = (f"{candidate.name} gives non-finite numbers (mean KLD {result.mean_kld}, perplexity "
                        f"{result.ppl_candidate}): its weights overflow or are NaN")
    return result


# --------------------------------------------------------------------------- the gate


def gate_checks(thresholds: dict, smoke_report: dict | None = None,
                distribution: Distribution | None = None) -> list[Check]:
    """Each threshold against what was measured (only the checks that ran)."""
    checks: list[Check] = []
    if smoke_report is not None:
        rate, limit = smoke_report["pass_rate"], thresholds["min_smoke_pass_rate"]
        failed = [r["id"] for r in smoke_report["results"] if not r["passed"]]
        checks.append(Check("smoke pass rate", "min_smoke_pass_rate", rate, limit, rate >= limit,
                            f"{smoke_report['passed']}/{smoke_report['total']} passed"
                            + (f"; failed: {', '.join(failed)}" if failed else "")))
    if distribution is not None:
        if distribution.error:
            checks.append(Check("distribution", "max_mean_kld", None, thresholds["max_mean_kld"], False,
                                distribution.error))
            return checks
        kld, top1, increase = distribution.mean_kld, distribution.top1_agreement, distribution.perplexity_increase
        checks.append(Check("mean KL divergence", "max_mean_kld", kld, thresholds["max_mean_kld"],
                            kld <= thresholds["max_mean_kld"], f"± {distribution.mean_kld_uncertainty:.6f}"))
        checks.append(Check("top-1 agreement", "min_top1_agreement", top1, thresholds["min_top1_agreement"],
                            top1 >= thresholds["min_top1_agreement"],
                            f"± {100 * distribution.top1_agreement_uncertainty:.2f} %"))
        checks.append(Check("perplexity increase", "max_perplexity_increase", increase,
                            thresholds["max_perplexity_increase"], increase <= thresholds["max_perplexity_increase"],
                            f"{number(distribution.ppl_reference)} -> {number(distribution.ppl_candidate)}"))
    return checks


def failed_summary(checks: list[Check]) -> str:
    """One line naming each failed check with its numbers."""
    parts = []
    for c in checks:
        if c.passed:
            continue
        if c.value is None:
            parts.append(f"{c.name}: {c.detail}")
        else:
            sense = "<" if c.threshold.startswith("min_") else ">"
            parts.append(f"{c.name} {_fmt(c.threshold, c.value)} {sense} {_fmt(c.threshold, c.limit)} "
                         f"(quality_gate.{c.threshold})")
    return "; ".join(parts)


def number(value: float | None, digits: int = 4) -> str:
    """A measured number for a table: fixed point, or 3 significant digits once it is huge (a broken model's
    perplexity can be 1e100)."""
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) >= 1e6 else f"{value:.{digits}f}"


def _fmt(threshold: str, value: float | None) -> str:
    if value is None:
        return "-"
    if threshold in ("min_smoke_pass_rate", "min_top1_agreement"):
        return f"{100 * value:.1f} %"
    if threshold == "max_perplexity_increase":
        return f"{100 * value:+.3g} %" if abs(100 * value) >= 1e6 else f"{100 * value:+.1f} %"
    return number(value, 6)


def format_checks(checks: list[Check]) -> str:
    rows = [("check", "measured", "limit", "result", "")]
    for c in checks:
        sense = ">=" if c.threshold.startswith("min_") else "<="
        rows.append((c.name, _fmt(c.threshold, c.value), f"{sense} {_fmt(c.threshold, c.limit)}",
                     "pass" if c.passed else "FAIL", c.detail))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(widths[i]) if i < 4 else cell for i, cell in enumerate(row)).rstrip()
                     for row in rows)


def format_smoke(report: dict) -> str:
    lines = [f"smoke set against {report['url']} (context window {report['context_window'] or 'unknown'}):"]
    for r in report["results"]:
        answer = r["answer"].strip().replace("\n", "\\n")
        answer = answer if len(answer) <= 60 else answer[:57] + "..."
        why = f" ({r['detail']})" if r["detail"] else ""
        lines.append(f"  {'pass' if r['passed'] else 'FAIL'}  {r['id']:<18} {r['what']:<32} {answer!r}{why}")
    lines.append(f"  {report['passed']}/{report['total']} passed ({100 * report['pass_rate']:.0f} %)")
    return "\n".join(lines)


def format_distribution(d: Distribution) -> str:
    if d.error:
        return f"distribution check of {d.candidate} against {d.reference}: {d.error}"
    return (f"distribution check of {d.candidate} against {d.reference} ({d.tokens} tokens of {Path(d.text).name}, "
            f"{d.seconds:.1f} s):\n"
            f"  mean KL divergence {number(d.mean_kld, 6)} ± {number(d.mean_kld_uncertainty, 6)} (99th percentile "
            f"{number(d.kld_p99, 6)})\n"
            f"  top-1 agreement    {100 * d.top1_agreement:.2f} ± {100 * d.top1_agreement_uncertainty:.2f} %\n"
            f"  perplexity         {number(d.ppl_reference)} (reference) -> {number(d.ppl_candidate)} (candidate), "
            f"{_fmt('max_perplexity_increase', d.perplexity_increase)}")


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Check that a model answers well: the smoke set against an OpenAI-compatible URL, and/or "
                           "the distribution of a model file against a reference (llama-perplexity --kl-divergence); "
                           "both against clawbot.json's quality_gate.")
    parser.add_argument("url", nargs="?", help="base URL of a gateway (https://model-node:5000), a chat node's API "
                        "(https://chat-node:8443/v1) or a model server (http://127.0.0.1:8081)")
    parser.add_argument("--config", help="clawbot.json whose quality_gate holds the thresholds (default: the "
                        "schema's defaults)")
    parser.add_argument("--json", dest="json_out", metavar="FILE", help="write the full report here")
    smoke_args = parser.add_argument_group("smoke set (with URL)")
    smoke_args.add_argument("--cacert", help="CA certificate to trust (the cluster CA: deploy prints its path)")
    smoke_args.add_argument("--cert", help="client certificate (the gateway's mTLS)")
    smoke_args.add_argument("--key", help="the client certificate's private key")
    smoke_args.add_argument("--api-key-file", help="file holding a bearer key (a chat node's API key, or the model "
                            "server's STATE_DIR/model-server.key)")
    smoke_args.add_argument("--model", help="model name to send (default: none, the server's own)")
    smoke_args.add_argument("--context-window", type=int, help="the served context window, where the server does "
                            "not say it (for the over-long prompt)")
    smoke_args.add_argument("--smoke-set", help="a smoke set of your own (format: clawbot/tools/data/smoke.json)")
    smoke_args.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per request")
    dist = parser.add_argument_group("distribution (model files on this machine)")
    dist.add_argument("--model-file", help="the candidate GGUF")
    dist.add_argument("--reference", help="the reference GGUF (the model serving now, or the source of a quant)")
    dist.add_argument("--text", help="text to score (default: the shipped clawbot/tools/data/eval-text.txt)")
    dist.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"tokens per chunk (default {DEFAULT_CTX})")
    dist.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS, help=f"chunks scored (default {DEFAULT_CHUNKS})")
    dist.add_argument("--threads", type=int, help="llama-perplexity threads (default: every CPU)")


def run(args: argparse.Namespace) -> int:
    try:
        if not args.url and not (args.model_file or args.reference):
            raise EvalError("give a URL (the smoke set), --model-file and --reference (the distribution check), "
                            "or both")
        if bool(args.model_file) != bool(args.reference):
            raise EvalError("--model-file and --reference go together")
        thresholds = gate_thresholds(args.config)
        report: dict = {"thresholds": thresholds}
        smoke_report = distribution = None
        if args.url:
            items = load_smoke_set(args.smoke_set)
            api_key = None
            if args.api_key_file:
                try:
                    api_key = Path(args.api_key_file).read_text().strip()
                except OSError as exc:
                    raise EvalError(f"--api-key-file {args.api_key_file}: {exc.strerror or exc}") from None
            smoke_report = smoke(args.url, items, cacert=args.cacert, cert=args.cert, key=args.key, api_key=api_key,
                                 model=args.model, context=args.context_window, timeout=args.timeout)
            print(format_smoke(smoke_report))
            report["smoke"] = smoke_report
        if args.model_file:
            distribution = distribution_check(args.model_file, args.reference, args.text, ctx=args.ctx,
                                              chunks=args.chunks, threads=args.threads,
                                              log=lambda m: print(m, file=sys.stderr))
            print(format_distribution(distribution))
            report["distribution"] = {**asdict(distribution), "perplexity_increase": distribution.perplexity_increase}
    except EvalError as exc:
        print(f"clawbot eval: {exc}", file=sys.stderr)
        return 2
    checks = gate_checks(thresholds, smoke_report, distribution)
    print()
    print(format_checks(checks))
    passed = all(c.passed for c in checks)
    print("quality gate: passed" if passed else f"quality gate: FAILED: {failed_summary(checks)}")
    report["checks"] = [asdict(c) for c in checks]
    report["passed"] = passed
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0 if passed else 1
