"""`clawbot validate FILE... [--format text|json|github|sarif] [--inventory DIR]`

Exit status: 0 every file valid (warnings allowed), 1 any file invalid, 2 usage error or a path that cannot
be read as a file. Imports neither the agent's server stack nor pyinfra; ansible only for --inventory.
"""

from __future__ import annotations

import contextlib
import json
import sys

from clawbot import __version__
from clawbot.common.config import CheckResult, Diagnostic, UnreadableFile, check_file

FORMATS = ("text", "json", "github", "sarif")


def add_arguments(parser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="clawbot.json files to check")
    parser.add_argument("--format", choices=FORMATS, default="text", help="output format (default: text)")
    parser.add_argument("--inventory", "-i", metavar="DIR",
                        help="also check an Ansible-format inventory and that the endpoint is one of its model nodes")
    parser.add_argument("--vault-password-file", metavar="FILE",
                        help="not needed for checking: vault-encrypted values are accepted without decrypting")


# Format-checker libraries jsonschema imports eagerly but our schemas never use (only `uri` is used, checked
# by rfc3987). Hiding them while jsonschema loads cuts the command's start-up by about a third.
_UNUSED_FORMAT_LIBRARIES = ("isoduration", "arrow", "webcolors", "jsonpointer", "uri_template", "fqdn", "idna",
                            "rfc3339_validator", "rfc3986_validator")


@contextlib.contextmanager
def _without_unused_format_libraries():
    hidden = [name for name in _UNUSED_FORMAT_LIBRARIES if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # makes `import name` raise ImportError: jsonschema skips that format
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, ...) is None:
                del sys.modules[name]


def run(args) -> int:
    with _without_unused_format_libraries():
        import jsonschema  # noqa: F401  (loaded once, here, without the unused format libraries)
    results: list[CheckResult] = []
    unreadable: list[str] = []
    inventory_facts = None
    if args.inventory:
        from clawbot.control.inventory import InventoryError, check_inventory

        try:
            inventory_result, inventory_facts = check_inventory(args.inventory)
        except InventoryError as exc:
            print(f"clawbot validate: {exc}", file=sys.stderr)
            return 2
        results.append(inventory_result)
    for path in args.files:
        try:
            results.append(check_file(path, inventory_facts))
        except UnreadableFile as exc:
            unreadable.append(str(exc))
    if inventory_facts is not None:
        for result in results[1:]:
            if result.ok:
                result.diagnostics.extend(declared_fit_diagnostics(inventory_facts, result.config, args.inventory))
    diagnostics = [d for r in results for d in r.diagnostics]
    emit(args.format, results, diagnostics, sys.stdout)
    for message in unreadable:
        print(f"clawbot validate: {message}", file=sys.stderr)
    if unreadable:
        return 2
    return 0 if all(r.ok for r in results) else 1


def declared_fit_diagnostics(facts, config: dict, inventory_dir: str) -> list[Diagnostic]:
    """Static preflight: does the model fit each model node's declared memory (clawbot_memory_mib)?"""
    import os

    from clawbot.common import preflight
    from clawbot.common import sizing

    base = inventory_dir if os.path.isdir(inventory_dir) else os.path.dirname(inventory_dir)
    out = []
    for host in facts.model_hosts:
        memory_mib = host.vars.get("clawbot_memory_mib")
        model_file = host.vars.get("clawbot_model_file")
        if not isinstance(memory_mib, int) or memory_mib <= 0 or not isinstance(model_file, str) or not model_file:
            continue
        path = model_file if os.path.isabs(model_file) else os.path.join(base, model_file)
        if not os.path.isfile(path):
            continue  # the model is not on this machine (a CI checkout): nothing to size
        report = preflight.declared_fit(sizing.read_model_info(path), config, memory_mib)
        file, line, col = host.origins.get("clawbot_memory_mib", (facts.source, 1, 1))
        for finding in report.findings:
            if finding.level == "error":
                out.append(Diagnostic(file, line, col, "error", "/clawbot_memory_mib",
                                      f"{host.name}: {finding.message}", rule="preflight"))
    return out


def emit(fmt: str, results: list[CheckResult], diagnostics: list[Diagnostic], out) -> None:
    if fmt == "text":
        for d in diagnostics:
            print(d.text(), file=out)
        bad = sum(not r.ok for r in results)
        errors = sum(d.severity == "error" for d in diagnostics)
        warnings = len(diagnostics) - errors
        if results:
            status = "ok" if not bad else f"{bad} invalid"
            print(f"{len(results)} file(s) checked: {status}, {errors} error(s), {warnings} warning(s)",
                  file=sys.stderr)
    elif fmt == "json":
        json.dump(
            {"files": [{"file": r.file, "valid": r.ok} for r in results],
             "diagnostics": [_as_dict(d) for d in diagnostics]},
            out, indent=2)
        out.write("\n")
    elif fmt == "github":
        for d in diagnostics:
            title = _gh_property(f"clawbot validate: {d.pointer or '/'}")
            message = d.message + (f" ({d.hint})" if d.hint else "")
            print(f"::{d.severity} file={_gh_property(d.file)},line={d.line},col={d.col},title={title}::{_gh_data(message)}",
                  file=out)
    elif fmt == "sarif":
        json.dump(sarif(diagnostics), out, indent=2)
        out.write("\n")


def _as_dict(d: Diagnostic) -> dict:
    return {"file": d.file, "line": d.line, "column": d.col, "severity": d.severity, "pointer": d.pointer,
            "message": d.message, "hint": d.hint, "rule": d.rule}


def _gh_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_property(text: str) -> str:
    return _gh_data(text).replace(":", "%3A").replace(",", "%2C")


def sarif(diagnostics: list[Diagnostic]) -> dict:
    """A SARIF 2.1.0 log: one run, one rule per diagnostic kind, a region per finding."""
    rule_ids = sorted({d.rule for d in diagnostics})
    rules = [{"id": rule, "shortDescription": {"text": f"clawbot config check: {rule}"}} for rule in rule_ids]
    results = []
    for d in diagnostics:
        text = d.message + (f" ({d.hint})" if d.hint else "")
        results.append({
            "ruleId": d.rule,
            "ruleIndex": rule_ids.index(d.rule),
            "level": "error" if d.severity == "error" else "warning",
            "message": {"text": f"{d.pointer or '/'}: {text}"},
            "locations": [{
                "physicalLocation": {
                    "artifactLocation": {"uri": d.file.replace("\\", "/")},
                    "region": {"startLine": d.line, "startColumn": d.col},
                }
            }],
        })
    return {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "clawbot-validate", "version": __version__, "rules": rules}},
            "results": results,
        }],
    }
