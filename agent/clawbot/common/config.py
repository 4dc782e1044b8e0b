"""clawbot.json: read, check against the schema and the cross-field rules, fill in defaults.

One code path for every reader: `clawbot validate` (PR checks), deploy.py (refuse to roll out) and the
agent (refuse to start, refuse a bad reload) all call `check_bytes`/`load_config`, so a config that passes
in CI is exactly the config that a node accepts.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from urllib.parse import urlsplit

from clawbot.common import jsonpos
from clawbot.common.jsonpos import Document, JSONSyntaxError, escape_pointer_token
from clawbot.model.engines import engine_for
from clawbot.model.runplan import configured_slots

CONFIG_SCHEMA = "clawbot.schema.json"
NODE_CONFIG_DIR = "/etc/clawbot"  # where the rollout installs clawbot.json (and the files it names) on every node
NODE_CONFIG_PATH = f"{NODE_CONFIG_DIR}/clawbot.json"


@dataclass(frozen=True)
class Diagnostic:
    """One finding, positioned at the offending value (or key) of one file."""

    file: str
    line: int
    col: int
    severity: str  # "error" | "warning"
    pointer: str
    message: str
    hint: str = ""
    rule: str = "schema"

    def sort_key(self):
        return (self.file, self.line, self.col, self.pointer, self.message)

    def text(self) -> str:
        hint = f" ({self.hint})" if self.hint else ""
        pointer = self.pointer or "/"
        return f"{self.file}:{self.line}:{self.col}: {self.severity}: {pointer}: {self.message}{hint}"


class UnreadableFile(OSError):
    """The path cannot be read as a file at all (missing, a directory, no permission)."""


class ConfigError(Exception):
    """Raised by load_config: the config is invalid; `diagnostics` says where and why."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = diagnostics
        super().__init__("\n".join(d.text() for d in diagnostics if d.severity == "error"))


@dataclass
class CheckResult:
    file: str
    diagnostics: list[Diagnostic] = field(default_factory=list)
    config: dict | None = None  # with defaults filled in; None when invalid
    document: Document | None = None

    @property
    def ok(self) -> bool:
        return not any(d.severity == "error" for d in self.diagnostics)


# ---------------------------------------------------------------------------------------------
# schema


@functools.cache
def load_schema(name: str = CONFIG_SCHEMA) -> dict:
    return json.loads(resources.files("clawbot.schemas").joinpath(name).read_text(encoding="utf-8"))


@functools.cache
def _validator(name: str = CONFIG_SCHEMA):
    import jsonschema

    cls = jsonschema.Draft202012Validator
    return cls(load_schema(name), format_checker=cls.FORMAT_CHECKER)


def schema_at(schema: dict, pointer_parts) -> dict | None:
    """The subschema describing the instance at the given path (objects and arrays only)."""
    node = schema
    for part in pointer_parts:
        if isinstance(part, int) or (isinstance(part, str) and part.isdigit() and "items" in node):
            node = node.get("items", {})
        else:
            node = node.get("properties", {}).get(part)
        if node is None:
            return None
    return node


def defaults(schema: dict | None = None) -> dict:
    """The config a `{}` file stands for: every default of the schema."""
    schema = schema or load_schema()
    return _fill_defaults({}, schema)


def _fill_defaults(instance, schema):
    if not isinstance(instance, dict) or schema.get("type") != "object":
        return instance
    result = dict(instance)
    for key, sub in schema.get("properties", {}).items():
        if key not in result and "default" in sub:
            result[key] = copy.deepcopy(sub["default"])
        if key in result:
            result[key] = _fill_defaults(result[key], sub)
    return result


# ---------------------------------------------------------------------------------------------
# checking


def read_file_bytes(path: str) -> bytes:
    """Read a config file, turning 'cannot read at all' into UnreadableFile (exit 2 in the CLI)."""
    if os.path.isdir(path):
        raise UnreadableFile(f"{path}: is a directory, not a file")
    try:
        with open(path, "rb") as handle:
            return handle.read(jsonpos.MAX_BYTES + 1)
    except FileNotFoundError:
        raise UnreadableFile(f"{path}: no such file") from None
    except OSError as exc:
        raise UnreadableFile(f"{path}: cannot read: {exc.strerror or exc}") from None


def check_file(path: str, inventory: "InventoryFacts | None" = None) -> CheckResult:
    return check_bytes(read_file_bytes(path), path, inventory)


def check_bytes(data: bytes, filename: str, inventory: "InventoryFacts | None" = None) -> CheckResult:
    result = CheckResult(filename)
    try:
        document = jsonpos.parse(jsonpos.decode_bytes(data))
    except JSONSyntaxError as exc:
        result.diagnostics.append(
            Diagnostic(filename, exc.line, exc.col, "error", "", exc.message, exc.hint, rule="syntax")
        )
        return result
    result.document = document
    for problem in document.problems:
        result.diagnostics.append(
            Diagnostic(filename, problem.line, problem.col, "error", problem.pointer, problem.message, problem.hint, "syntax")
        )
    schema_errors = _schema_diagnostics(document, filename)
    result.diagnostics.extend(schema_errors)
    if isinstance(document.value, dict):
        config = _fill_defaults(document.value, load_schema())
        broken = {d.pointer for d in schema_errors}
        result.diagnostics.extend(_cross_field_diagnostics(config, document, filename, inventory, broken))
        if result.ok:
            result.config = config
    result.diagnostics.sort(key=Diagnostic.sort_key)
    return result


def load_config(path: str) -> dict:
    """The agent's entry: a checked config with defaults, or ConfigError naming file:line:col."""
    result = check_file(path)
    if not result.ok:
        raise ConfigError(result.diagnostics)
    return result.config


def _pointer(parts) -> str:
    return "".join(f"/{escape_pointer_token(p)}" for p in parts)


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else ""


_TYPE_NAMES = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
               "object": "an object {...}", "array": "a list [...]", "null": "null"}


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _schema_diagnostics(document: Document, filename: str) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    for error in _validator().iter_errors(document.value):
        parts = list(error.absolute_path)
        pointer = _pointer(parts)
        kind = error.validator
        schema = error.schema if isinstance(error.schema, dict) else {}
        if kind == "additionalProperties" and isinstance(error.instance, dict):
            known = list(schema.get("properties", {}))
            for key in error.instance:
                if key in known:
                    continue
                key_pointer = f"{pointer}/{escape_pointer_token(key)}"
                line, col = document.position(key_pointer, key=True)
                hint = _suggest(key, known) or (f"allowed keys here: {', '.join(known)}" if known else "")
                where = f"in {pointer}" if pointer else "at the top level"
                out.append(Diagnostic(filename, line, col, "error", key_pointer, f"unknown key '{key}' {where}", hint, "unknown-key"))
            continue
        line, col = document.position(pointer)
        value = error.instance
        hint = ""
        if kind == "enum":
            allowed = ", ".join(json.dumps(v) for v in error.validator_value)
            message = f"{json.dumps(value)} is not one of {allowed}"
            hint = _suggest(value, error.validator_value) if isinstance(value, str) else ""
        elif kind == "type":
            wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
            message = f"expected {' or '.join(_TYPE_NAMES.get(w, w) for w in wanted)}, found {_json_type(value)}"
            if isinstance(value, str) and "integer" in wanted and value.strip().lstrip("-").isdigit():
                hint = f"write {value.strip()} without quotes"
        elif kind in ("pattern", "format") and "x-error" in schema:
            message = schema["x-error"]
            hint = _endpoint_hint(value)
        elif kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            words = {"minimum": "at least", "maximum": "at most", "exclusiveMinimum": "greater than",
                     "exclusiveMaximum": "less than"}[kind]
            message = f"{json.dumps(value)} is out of range: must be {words} {error.validator_value}"
        elif kind == "uniqueItems":
            message = "list has repeated items: each may appear once"
        elif kind == "pattern" and schema.get("pattern") == "^/":
            message = f"{json.dumps(value)} must be an absolute path (starting with /)"
        else:
            message = error.message
        out.append(Diagnostic(filename, line, col, "error", pointer, message, hint, f"schema/{kind}"))
    return out


def _endpoint_hint(value) -> str:
    if not isinstance(value, str):
        return ""
    try:
        parts = urlsplit(value.strip())
    except ValueError:  # e.g. an unbalanced "[" in the host: no hint beyond the example
        return "e.g. \"https://192.168.1.100:5000\""
    if parts.netloc:
        return f"write \"https://{parts.netloc}\""
    return "e.g. \"https://192.168.1.100:5000\""


# ---------------------------------------------------------------------------------------------
# cross-field rules (what a schema cannot say)


@dataclass
class InventoryFacts:
    """What the config checks need from an inventory: every name/address by group."""

    source: str
    model_node_names: set[str]
    all_node_names: set[str]
    model_hosts: list = field(default_factory=list)  # clawbot.control.inventory.Host objects, for the static fit check


def gateway_host_port(endpoint: str) -> tuple[str, int]:
    parts = urlsplit(endpoint)
    return parts.hostname or "", parts.port or 443


def _cross_field_diagnostics(config: dict, document: Document, filename: str, inventory: InventoryFacts | None,
                             broken: set[str] = frozenset()):
    """Rules across fields. A rule whose inputs already failed the schema is skipped, the others still run,
    so one pass reports every error."""
    out: list[Diagnostic] = []
    for rule in _CROSS_FIELD_RULES:
        inputs = rule.inputs
        if any(p == b or p.startswith(b + "/") or b.startswith(p + "/") or b == "" for p in inputs for b in broken):
            continue
        try:
            rule(config, document, filename, inventory, out)
        except (TypeError, KeyError, ValueError, AttributeError):
            continue  # a wrong shape the schema already reported
    return out


_CROSS_FIELD_RULES: list = []


def _rule(*inputs: str):
    """Register a cross-field rule with the pointers it reads (skipped when one of them failed the schema)."""

    def register(function):
        function.inputs = inputs
        _CROSS_FIELD_RULES.append(function)
        return function

    return register


def _adder(document: Document, filename: str, out: list):
    def add(pointer, message, hint="", severity="error", rule="cross-field"):
        line, col = document.position(pointer)
        present = pointer in document.value_pos
        suffix = "" if present else " (from the default)"
        out.append(Diagnostic(filename, line, col, severity, pointer, message + suffix, hint, rule))

    return add


@_rule("/model_gateway/max_tokens", "/context_window")
def _rule_reply_fits(config, document, filename, inventory, out):
    """A reply of max_tokens must leave room for the prompt."""
    window, max_tokens = config["context_window"], config["model_gateway"]["max_tokens"]
    if max_tokens >= window:
        _adder(document, filename, out)(
            "/model_gateway/max_tokens",
            f"max_tokens ({max_tokens}) must be smaller than context_window ({window}): no room would be left for the prompt",
            f"lower max_tokens to at most {window // 2} or raise context_window")


@_rule("/model_gateway/max_tokens", "/context_window", "/chat/summary")
def _rule_summary_fits(config, document, filename, inventory, out):
    """A summary must fit the prompt budget it is meant to save."""
    window, max_tokens = config["context_window"], config["model_gateway"]["max_tokens"]
    summary = config["chat"]["summary"]
    if max_tokens < window and summary["enabled"] and summary["max_tokens"] >= window - max_tokens:
        _adder(document, filename, out)(
            "/chat/summary/max_tokens",
            f"summary max_tokens ({summary['max_tokens']}) must be smaller than the prompt budget "
            f"context_window - max_tokens = {window - max_tokens}")


@_rule("/auth/oidc", "/auth/session_idle_timeout_s", "/auth/session_max_age_s")
def _rule_auth(config, document, filename, inventory, out):
    """SSO needs a provider and a client; a session cannot idle longer than it may live."""
    auth, add = config["auth"], _adder(document, filename, out)
    oidc = auth["oidc"]
    if oidc["enabled"]:
        for key in ("issuer", "client_id"):
            if not oidc[key]:
                add(f"/auth/oidc/{key}", f"auth.oidc.enabled is true but auth.oidc.{key} is empty",
                    "set it to what the identity provider registered for clawbot (docs/sso.md)")
        try:
            host = urlsplit(oidc["issuer"]).hostname
        except ValueError:
            host = None
            add("/auth/oidc/issuer", f"auth.oidc.issuer {oidc['issuer']!r} is not a URL")
        if host is not None and oidc["issuer"].startswith("http://") and host not in ("127.0.0.1", "localhost", "::1"):
            add("/auth/oidc/issuer", "auth.oidc.issuer must be https:// (plain http only on loopback, for tests)")
        if "openid" not in oidc["scopes"]:
            add("/auth/oidc/scopes", "auth.oidc.scopes must include openid", 'add "openid"')
    if auth["session_idle_timeout_s"] > auth["session_max_age_s"]:
        add("/auth/session_idle_timeout_s", f"session_idle_timeout_s ({auth['session_idle_timeout_s']}) is longer than "
            f"session_max_age_s ({auth['session_max_age_s']}): the idle timeout would never apply", severity="warning")


@_rule("/model_gateway", "/model_server/parallel_slots", "/model_server/engine")
def _rule_gateway_limits(config, document, filename, inventory, out):
    """Queue, burst and concurrency agree."""
    add = _adder(document, filename, out)
    gateway = config["model_gateway"]
    if gateway["queue_length"] > 0 and gateway["queue_timeout_s"] >= gateway["request_timeout_s"]:
        add("/model_gateway/queue_timeout_s",
            f"queue_timeout_s ({gateway['queue_timeout_s']}) must be shorter than request_timeout_s ({gateway['request_timeout_s']})")
    burst = gateway["rate_limit"]["burst"]
    if burst < gateway["max_concurrency"]:
        add("/model_gateway/rate_limit/burst",
            f"burst ({burst}) is smaller than max_concurrency ({gateway['max_concurrency']}): the concurrency limit can never be reached",
            f"set burst to at least {gateway['max_concurrency']}")
    slots = configured_slots(config)
    if slots is not None and gateway["max_concurrency"] > slots.value:
        add("/model_gateway/max_concurrency",
            f"max_concurrency ({gateway['max_concurrency']}) exceeds the model server's {slots.value} slot(s) "
            f"({slots.reason}): the gateway passes on only {slots.value} at a time, the rest wait in its queue",
            "make them equal", severity="warning")


@_rule("/model_server")
def _rule_model_server(config, document, filename, inventory, out):
    """Model server settings agree."""
    add = _adder(document, filename, out)
    server = config["model_server"]
    low, high = server["restart_backoff_s"]
    if low > high:
        add("/model_server/restart_backoff_s", f"first delay ({low}) is longer than the longest delay ({high})")
    value_type = server["cache_type_v"]
    if value_type not in ("f16", "f32", "bf16") and server["flash_attention"] == "off":
        add("/model_server/cache_type_v", f"a quantized V cache ({value_type}) needs flash attention, but flash_attention is \"off\"",
            "set flash_attention to \"auto\" or \"on\", or cache_type_v to \"f16\"")


@_rule("/model_gateway/endpoint", "/model_server/port", "/chat/port")
def _rule_ports(config, document, filename, inventory, out):
    """Services on one node need distinct ports."""
    add = _adder(document, filename, out)
    server, chat = config["model_server"], config["chat"]
    host, port = gateway_host_port(config["model_gateway"]["endpoint"])
    ports = {"model_gateway.endpoint": (port, "/model_gateway/endpoint"),
             "model_server.port": (server["port"], "/model_server/port"),
             "chat.port": (chat["port"], "/chat/port")}
    seen: dict[int, str] = {}
    for name, (number, pointer) in ports.items():
        if number in seen:
            add(pointer, f"port {number} is already used by {seen[number]}: a node running both roles could not start both",
                "give each service its own port")
        seen.setdefault(number, name)


@_rule("/model_server/split", "/model_server/engine", "/model_server/port", "/model_gateway/endpoint", "/chat/port")
def _rule_split(config, document, filename, inventory, out):
    """A split (docs/split.md) runs on llama-server, with ports of its own."""
    add = _adder(document, filename, out)
    server, split = config["model_server"], config["model_server"]["split"]
    workers = split["workers"]
    if workers and not engine_for(server["engine"]).RPC_SPLIT:
        add("/model_server/engine", f"model_server.split has {len(workers)} worker(s), but engine {server['engine']!r} "
            "has no RPC backend", 'set engine to "llama-server" (or empty model_server.split.workers)')
    if split["rpc_port"] == split["tunnel_port"]:
        add("/model_server/split/tunnel_port", f"tunnel_port ({split['tunnel_port']}) equals rpc_port: the worker's "
            "stunnel and its ggml-rpc-server cannot share a port", "give each its own port")
    _, gateway_port = gateway_host_port(config["model_gateway"]["endpoint"])
    taken = {server["port"]: "model_server.port", gateway_port: "model_gateway.endpoint", config["chat"]["port"]: "chat.port"}
    seen: dict[int, str] = {}
    for index, worker in enumerate(workers):
        pointer = f"/model_server/split/workers/{index}/port"
        port = worker["port"]
        if port in taken:
            add(pointer, f"worker {worker['name']}'s tunnel port {port} is already used by {taken[port]}")
        elif port in seen:
            add(pointer, f"workers {seen[port]} and {worker['name']} have the same tunnel port {port}",
                "each worker needs its own loopback port on the main node")
        seen.setdefault(port, worker["name"])
    names = [w["name"] for w in workers]
    for index, name in enumerate(names):
        if name in names[:index]:
            add(f"/model_server/split/workers/{index}/name", f"worker {name} is listed twice")


@_rule("/fallback_strategies", "/chat/knowledge_base", "/chat/web_search")
def _rule_fallbacks(config, document, filename, inventory, out):
    """Listed fallbacks are configured."""
    add = _adder(document, filename, out)
    chat = config["chat"]
    for index, strategy in enumerate(config["fallback_strategies"]):
        pointer = f"/fallback_strategies/{index}"
        if strategy == "knowledge_base" and not chat["knowledge_base"]["directory"]:
            add(pointer, "knowledge_base is listed but chat.knowledge_base.directory is empty")
        if strategy == "web_search" and not chat["web_search"]["endpoint"]:
            add(pointer, "web_search is listed but chat.web_search.endpoint is not set: it will be skipped (and logged) at run time",
                "set chat.web_search.endpoint to a SearxNG-compatible JSON search URL", severity="warning")


@_rule("/model_gateway/endpoint")
def _rule_endpoint_in_inventory(config, document, filename, inventory, out):
    """The endpoint names a model node."""
    if inventory is None:
        return
    add = _adder(document, filename, out)
    host, _ = gateway_host_port(config["model_gateway"]["endpoint"])
    if host not in inventory.model_node_names:
        known = sorted(inventory.model_node_names)
        hint = _suggest(host, known) or (f"model nodes: {', '.join(known)}" if known else "the inventory has no model_nodes")
        add("/model_gateway/endpoint",
            f"endpoint host '{host}' is not a name or address of a model node in inventory {inventory.source}", hint,
            rule="inventory")

