"""`clawbot quantize SRC.gguf --type Q4_K_M OUT.gguf [--imatrix TEXT]`: quantize with the vendored llama-quantize
(and llama-imatrix first, for an importance-matrix quant), then measure what it cost: the KL divergence,
top-1 agreement and perplexity of OUT against SRC on the shipped text (clawbot eval's distribution check),
printed as a table, and checked against clawbot.json's quality_gate.

The result is written beside OUT under a temporary name and renamed to OUT only when it passes the gate; a
refused result is removed (an earlier OUT is left as it was), and the exit status is 1. Exit status 2: a usage
error, an unreadable source, an invalid clawbot.json, a type llama-quantize does not know, or a missing tool.
deploy.py's quantize-once (`clawbot_model_source` + `clawbot_model_quant`) runs the same code
(clawbot.control.builds.quantized_model).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clawbot.tools import evaluate
from clawbot.tools.evaluate import Check, Distribution, EvalError

QUANT_TYPE_LINE = re.compile(r"^\s*(?:\d+\s+or\s+)?([A-Z][A-Z0-9_]+)\s+:", re.M)


def quant_types(tool: Path) -> list[str]:
    """The types this llama-quantize knows, from its own usage text."""
    done = subprocess.run([str(tool), "--help"], capture_output=True, text=True, errors="replace", timeout=60,
                          stdin=subprocess.DEVNULL)
    text = done.stdout + done.stderr
    return QUANT_TYPE_LINE.findall(text[text.find("allowed quantization types"):])


def file_type(path: Path) -> str:
    """general.file_type of a GGUF as llama.cpp names it (Q8_0, F16, ...), or '?'."""
    import gguf

    from clawbot.common.sizing import read_gguf_header

    try:
        value = read_gguf_header(path).metadata.get("general.file_type")
        name = gguf.LlamaFileType(int(value)).name
    except Exception:  # noqa: BLE001 - a header without it, or a type this gguf does not name
        return "?"
    return name.replace("MOSTLY_", "").replace("ALL_", "")


@dataclass
class QuantizeReport:
    source: str
    output: str
    type: str
    source_type: str
    source_bytes: int
    output_bytes: int = 0
    imatrix: str = ""
    imatrix_seconds: float = 0.0
    quantize_seconds: float = 0.0
    distribution: Distribution | None = None
    checks: list[Check] = field(default_factory=list)
    accepted: bool = False
    reason: str = ""

    def as_dict(self) -> dict:
        data = asdict(self)
        if self.distribution is not None:
            data["distribution"]["perplexity_increase"] = self.distribution.perplexity_increase
        return data


def _tool(name: str) -> Path:
    from clawbot.model.engines import build as engine

    tool = engine.find_tool(name)
    if tool is None:
        raise EvalError(f"{name} is not built: run `clawbot build-engine` (it builds llama-server and the llama.cpp "
                        "tools beside it from the pinned sources)")
    return tool


def _run(argv: list[str], what: str) -> float:
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=evaluate.TOOL_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise EvalError(f"{what} ran longer than {evaluate.TOOL_TIMEOUT_S} s") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        wanted = [line for line in lines
                  if re.search(r"error|failed|invalid|please|disabled|cannot|unable", line, re.I)]
        raise EvalError(f"{what} failed (exit {done.returncode}): "
                        + "; ".join(dict.fromkeys(wanted[-4:] or lines[-3:])))
    return time.monotonic() - started


def quantize_checked(source: str | Path, qtype: str, output: str | Path, *, thresholds: dict | None = None,
                     imatrix_text: str | Path | None = None, text: str | Path | None = None,
                     ctx: int = evaluate.DEFAULT_CTX, chunks: int = evaluate.DEFAULT_CHUNKS,
                     threads: int | None = None, allow_requantize: bool = False, log=print) -> QuantizeReport:
    """Quantize `source` to `qtype`, measure it against `source`, and leave it at `output` only if it passes.

    Raises EvalError for what is wrong before anything is measured (nothing is written then); a measured result
    that fails the gate comes back with accepted False and no file at `output` written by this call."""
    source, output = Path(source), Path(output)
    thresholds = thresholds if thresholds is not None else evaluate.gate_thresholds()
    if not source.is_file():
        raise EvalError(f"source {source}: no such file")
    evaluate._check_gguf(source, "source")
    if output.resolve() == source.resolve():
        raise EvalError(f"OUT {output} is the source: name another file")
    if not output.parent.is_dir():
        raise EvalError(f"OUT {output}: directory {output.parent} does not exist")
    if imatrix_text is not None and not Path(imatrix_text).is_file():
        raise EvalError(f"--imatrix {imatrix_text}: no such file")
    if text is not None and not Path(text).is_file():
        raise EvalError(f"--text {text}: no such file")
    quantizer = _tool("llama-quantize")
    known = quant_types(quantizer)
    if known and qtype not in known:
        raise EvalError(f"--type {qtype}: llama-quantize knows {', '.join(known)}")
    evaluate.find_perplexity_tool()
    if imatrix_text is not None:
        _tool("llama-imatrix")
    report = QuantizeReport(str(source), str(output), qtype, file_type(source), source.stat().st_size,
                            imatrix=str(imatrix_text or ""))
    threads = threads or os.cpu_count() or 1
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    try:
        with tempfile.TemporaryDirectory(prefix="clawbot-quantize-") as scratch:
            argv = [str(quantizer)]
            if allow_requantize:
                argv.append("--allow-requantize")
            if imatrix_text is not None:
                matrix = Path(scratch) / "imatrix.gguf"
                log(f"computing the importance matrix of {source.name} on {imatrix_text}")
                report.imatrix_seconds = round(_run(
                    [str(_tool("llama-imatrix")), "-m", str(source), "-f", str(imatrix_text), "-o", str(matrix),
                     "-c", str(ctx), "-t", str(threads), "--no-ppl"], "llama-imatrix"), 2)
                argv += ["--imatrix", str(matrix)]
            log(f"quantizing {source.name} to {qtype}")
            report.quantize_seconds = round(_run(argv + [str(source), str(partial), qtype, str(threads)],
                                                 "llama-quantize"), 2)
        report.output_bytes = partial.stat().st_size
        log(f"measuring {qtype} against {source.name}")
        report.distribution = evaluate.distribution_check(partial, source, text, ctx=ctx, chunks=chunks,
                                                          threads=threads)
        report.distribution.candidate = str(output)
        report.distribution.error = report.distribution.error.replace(str(partial), str(output))
        report.checks = evaluate.gate_checks(thresholds, distribution=report.distribution)
        report.accepted = all(c.passed for c in report.checks)
        if report.accepted:
            os.replace(partial, output)
        else:
            report.reason = evaluate.failed_summary(report.checks)
    finally:
        partial.unlink(missing_ok=True)
    return report


def _size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def format_report(report: QuantizeReport) -> str:
    d = report.distribution
    rows = [("", "file", "type", "size", "perplexity", "vs source", "mean KLD", "top-1 agreement")]
    rows.append(("source", Path(report.source).name, report.source_type, _size(report.source_bytes),
                 evaluate.number(d.ppl_reference) if d else "-", "", "", ""))
    if d is not None and not d.error:
        rows.append(("result", Path(report.output).name, report.type, _size(report.output_bytes),
                     evaluate.number(d.ppl_candidate), evaluate._fmt("max_perplexity_increase", d.perplexity_increase),
                     evaluate.number(d.mean_kld, 6), f"{100 * d.top1_agreement:.2f} %"))
    else:
        rows.append(("result", Path(report.output).name, report.type, _size(report.output_bytes), "-", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    if d is not None:
        lines.append("")
        lines.append(f"{d.tokens} tokens of {Path(d.text).name}, {d.chunks} chunks of {d.ctx}; quantized in "
                     f"{report.quantize_seconds:.1f} s, measured in {d.seconds:.1f} s" if not d.error else d.error)
        lines.append("")
        lines.append(evaluate.format_checks(report.checks))
    if report.accepted:
        lines.append(f"accepted: {report.output} written")
    else:
        lines.append(f"REFUSED: {report.reason}; {report.output} was not written")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Quantize a GGUF with the vendored llama-quantize, measure the result against its source "
                          "(KL divergence, top-1 agreement, perplexity) and keep it only within clawbot.json's "
                          "quality_gate.")
    parser.add_argument("source", metavar="SRC.gguf", help="the model to quantize (F16, BF16, F32, or a quant with "
                        "--allow-requantize)")
    parser.add_argument("output", metavar="OUT.gguf", help="where the result goes (only if it passes the gate)")
    parser.add_argument("--type", required=True, dest="qtype", help="llama-quantize's type: Q4_K_M, Q8_0, Q4_0, ...")
    parser.add_argument("--imatrix", metavar="TEXT", help="compute an importance matrix on this text with "
                        "llama-imatrix first and quantize with it (needed by the IQ types)")
    parser.add_argument("--allow-requantize", action="store_true", help="allow a source that is already quantized")
    parser.add_argument("--config", help="clawbot.json whose quality_gate holds the thresholds (default: the "
                        "schema's defaults)")
    parser.add_argument("--text", help="text to score (default: clawbot eval's shipped text)")
    parser.add_argument("--ctx", type=int, default=evaluate.DEFAULT_CTX, help="tokens per scored chunk")
    parser.add_argument("--chunks", type=int, default=evaluate.DEFAULT_CHUNKS, help="chunks scored")
    parser.add_argument("--threads", type=int, help="threads for the tools (default: every CPU)")
    parser.add_argument("--json", dest="json_out", metavar="FILE", help="write the report here")


def run(args: argparse.Namespace) -> int:
    say = lambda message: print(message, file=sys.stderr)  # noqa: E731
    try:
        thresholds = evaluate.gate_thresholds(args.config)
        report = quantize_checked(args.source, args.qtype, args.output, thresholds=thresholds,
                                  imatrix_text=args.imatrix, text=args.text, ctx=args.ctx, chunks=args.chunks,
                                  threads=args.threads, allow_requantize=args.allow_requantize, log=say)
    except EvalError as exc:
        print(f"clawbot quantize: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report.as_dict(), indent=2))
    return 0 if report.accepted else 1
