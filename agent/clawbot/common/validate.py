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
    inventory_facts = inventory = None
    if args.inventory:
        from clawbot.control.inventory import InventoryError, check_inventory, load_inventory

        try:
            inventory = load_inventory(args.inventory, decrypt=False)
            inventory_result, inventory_facts = check_inventory(args.inventory, inventory=inventory)
        except InventoryError as exc:
            print(f"clawbot validate: {exc}", file=sys.stderr)
            return 2
        inventory_result.diagnostics.extend(model_source_diagnostics(inventory))
        results.append(inventory_result)
    for path in args.files:
        try:
            results.append(check_file(path, inventory_facts))
        except UnreadableFile as exc:
            unreadable.append(str(exc))
    if inventory_facts is not None:
        for result in results[1:]:
            if result.ok:
                from clawbot.control import split  # a split's main node is judged with its workers' memory

                result.diagnostics.extend(declared_fit_diagnostics(inventory_facts, result.config, args.inventory,
                                                                   skip=split.split_mains(inventory)))
                result.diagnostics.extend(split.declared_diagnostics(inventory, result.config, args.inventory))
                result.diagnostics.extend(fallback_diagnostics(inventory, result))
    diagnostics = [d for r in results for d in r.diagnostics]
    emit(args.format, results, diagnostics, sys.stdout)
    for message in unreadable:
        print(f"clawbot validate: {message}", file=sys.stderr)
    if unreadable:
        return 2
    return 0 if all(r.ok for r in results) else 1


def model_source_diagnostics(inventory) -> list[Diagnostic]:
    """clawbot_model_source (quantized by deploy) and clawbot_model_file (staged as it is) both name the model:
    a model node may set one of them. deploy.py refuses the same (clawbot.control.builds.model_source)."""
    out, seen = [], set()
    for host in inventory.group("model_nodes"):
        if not (host.vars.get("clawbot_model_source") and host.vars.get("clawbot_model_file")):
            continue
        file, line, col = host.origins.get("clawbot_model_source", (inventory.source, 1, 1))
        if (file, line, col) in seen:  # a group variable: once
            continue
        seen.add((file, line, col))
        out.append(Diagnostic(file, line, col, "error", "/clawbot_model_source",
                              f"{host.name}: clawbot_model_source and clawbot_model_file are both set",
                              "keep clawbot_model_file to stage a GGUF as it is, or clawbot_model_source (with "
                              "clawbot_model_quant) to have deploy quantize it", rule="inventory"))
    return out


def declared_fit_diagnostics(facts, config: dict, inventory_dir: str, skip=frozenset()) -> list[Diagnostic]:
    """Static preflight: does the model fit each model node's declared memory (clawbot_memory_mib)? `skip`: model
    nodes judged elsewhere (a split's main nodes: clawbot.control.split.declared_diagnostics)."""
    import os

    from clawbot.common import preflight
    from clawbot.common import sizing

    base = inventory_dir if os.path.isdir(inventory_dir) else os.path.dirname(inventory_dir)
    out = []
    for host in facts.model_hosts:
        if host.name in skip:
            continue
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


# Where the chat agent's hardened systemd unit (roles/services.py) shows the service an empty directory of its own:
# documents there are invisible to it (ProtectHome=yes, PrivateTmp=yes).
_HIDDEN_FROM_SYSTEMD_UNIT = {"/home": "ProtectHome=yes", "/root": "ProtectHome=yes", "/run/user": "ProtectHome=yes",
                             "/tmp": "PrivateTmp=yes", "/var/tmp": "PrivateTmp=yes"}
_AGENT_CONFIG_DIR = "/etc/clawbot"  # root-owned (roles/agent.py CONFIG_DIR)
_AGENT_STATE_DIR = "/var/lib/clawbot"  # the agent's own (roles/agent.py STATE_DIR)


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def fallback_diagnostics(inventory, result: CheckResult) -> list[Diagnostic]:
    """Warnings for a configured fallback that cannot work on the inventory's chat nodes as written.

    (web_search without an endpoint is warned about by the config's own rules, with or without an inventory.)
    knowledge_base: a directory the chat agent's systemd unit hides from it, or one that overlaps what deploy
    keeps owned by root (the agent's config directory, clawbot_prefix) or holds a directory of the agent's
    (deploy makes the knowledge directory the agent user's own)."""
    import posixpath

    from clawbot.control.inventory import Vaulted, inventory_var

    config = result.config
    chat_hosts = inventory.group("chat_nodes")
    if "knowledge_base" not in config["fallback_strategies"] or not chat_hosts:
        return []
    pointer = "/chat/knowledge_base/directory"
    directory = posixpath.normpath(config["chat"]["knowledge_base"]["directory"])
    line, col = result.document.position(pointer)
    default = "" if pointer in result.document.value_pos else " (from the default)"
    index = config["fallback_strategies"].index("knowledge_base")
    out = []

    def warn(hosts, message):
        names = ", ".join(h.name for h in hosts)
        out.append(Diagnostic(result.file, line, col, "warning", pointer,
                              f"knowledge_base (fallback_strategies/{index}) cannot work on {names}: "
                              f"chat.knowledge_base.directory {directory} {message}{default}",
                              "use a directory of its own, such as /var/lib/clawbot/knowledge (the default)",
                              rule="fallback"))

    systemd_hosts = [h for h in chat_hosts if inventory_var(h.vars, "clawbot_service_manager") != "supervisor"]
    for top, setting in _HIDDEN_FROM_SYSTEMD_UNIT.items():
        if systemd_hosts and _under(directory, top):
            warn(systemd_hosts, f"is under {top}, which the chat agent's systemd unit hides from it ({setting}): "
                                "it would see no documents")
    root_owned = {_AGENT_CONFIG_DIR: ("the agent's config directory", chat_hosts)}
    for host in chat_hosts:
        prefix = inventory_var(host.vars, "clawbot_prefix")
        if not isinstance(prefix, Vaulted):
            name, hosts = root_owned.setdefault(posixpath.normpath(str(prefix)), ("clawbot_prefix", []))
            if host not in hosts:
                hosts.append(host)
    for path, (what, hosts) in sorted(root_owned.items()):
        if _under(directory, path) or _under(path, directory):
            warn(hosts, f"overlaps {path} ({what}), which deploy keeps owned by root: each rollout would change "
                        "the owner back and forth")
    if directory != _AGENT_STATE_DIR and _under(_AGENT_STATE_DIR, directory):
        warn(chat_hosts, f"holds {_AGENT_STATE_DIR}: deploy would hand {directory} to the agent's user")
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
