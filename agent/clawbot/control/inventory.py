"""Ansible-format inventories, read with ansible-core: the only module that imports ansible.

ansible-core is GPL-3 and heavy to import, so it stays on the control machine's side: deploy.py and
`clawbot validate --inventory` import this module; the agent never does. Values come back from ansible as
tagged types carrying their origin (file, line, column); we keep the origin for error messages and hand
the rest of clawbot plain JSON-able Python.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from dataclasses import dataclass, field

from clawbot.common.config import CheckResult, Diagnostic, InventoryFacts, load_schema

INVENTORY_SCHEMA = "inventory.schema.json"
GROUPS = ("chat_nodes", "model_nodes")
# clawbot's own files inside an inventory directory (clawbot.json, the default inventory's generated admin password,
# a state directory) live under this folder: Ansible skips every name that starts with a dot, whatever its
# configuration says, so `ansible -i DIR` and `ansible-inventory -i DIR` see only what the user wrote.
CLAWBOT_DIR = ".clawbot"
# What clawbot's own reading skips as well, for inventories laid out before CLAWBOT_DIR (load_inventory); Ansible's
# own tools read them, so `foreign_files` tells the user to move them.
NOT_INVENTORY = r"^(clawbot.*\.json|.*\.gguf|models|state|result.*\.json)$"
# ansible-core 2.19's own rules for a directory source: names it always skips, and its default
# INVENTORY_IGNORE_EXTS (a user's ansible.cfg may change the extensions, never the dot rule).
ANSIBLE_ALWAYS_SKIPS = r"^(\..*|host_vars|group_vars|vars_plugins)$"
ANSIBLE_DEFAULT_IGNORE_EXTS = (".pyc", ".pyo", ".swp", ".bak", "~", ".rpm", ".md", ".txt", ".rst", ".orig", ".cfg",
                               ".retry")


@functools.cache
def inventory_defaults() -> dict:
    """Every inventory variable's default, from schemas/inventory.schema.json."""
    schema = load_schema(INVENTORY_SCHEMA)
    return {name: spec["default"] for name, spec in schema["properties"].items() if "default" in spec}


def inventory_var(host_vars: dict, name: str):
    """The host's value of an inventory variable; unset, null or "" gives the schema's default."""
    value = host_vars.get(name)
    if value is None or value == "":
        defaults = inventory_defaults()
        if name not in defaults:
            raise KeyError(f"{name} has no default in {INVENTORY_SCHEMA}")
        return defaults[name]
    return value


class InventoryError(Exception):
    """The inventory cannot be read at all (missing directory, unreadable vault password, YAML error)."""


class Vaulted:
    """Stands for a vault-encrypted value that was not decrypted (checking needs no password)."""

    def __repr__(self):
        return "<vault-encrypted>"


VAULTED = Vaulted()


@dataclass
class Host:
    name: str
    groups: list[str]
    vars: dict
    origins: dict[str, tuple[str, int, int]] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return str(self.vars.get("clawbot_address") or self.vars.get("ansible_host") or self.name)

    @property
    def names(self) -> list[str]:
        """Every name and address this host answers to (for /etc/hosts, SANs, endpoint checks)."""
        found = [self.name, self.address, str(inventory_var(self.vars, "ansible_host"))]
        found += [str(n) for n in inventory_var(self.vars, "clawbot_names") if not isinstance(n, Vaulted)]
        return list(dict.fromkeys(n for n in found if n))


@dataclass
class Inventory:
    source: str
    hosts: dict[str, Host]
    notes: list[tuple[str, str]] = field(default_factory=list)  # (path, what to do): foreign_files

    def group(self, name: str) -> list[Host]:
        return [h for h in self.hosts.values() if name in h.groups]

    def facts(self) -> InventoryFacts:
        model = {n for h in self.group("model_nodes") for n in h.names}
        every = {n for h in self.hosts.values() for n in h.names}
        return InventoryFacts(self.source, model, every, self.group("model_nodes"))


def _origin(value):
    from ansible._internal._datatag._tags import Origin

    origin = Origin.get_tag(value)
    if origin is None or not origin.path:
        return None
    return (origin.path, origin.line_num or 1, origin.col_num or 1)


def _plain(value, templar, decrypt: bool):
    """Tagged ansible values -> plain Python; templates rendered; vault values decrypted or VAULTED."""
    from ansible.parsing.vault import EncryptedString

    if isinstance(value, EncryptedString):
        if not decrypt:
            return VAULTED
    if isinstance(value, dict):
        return {str(k): _plain(v, templar, decrypt) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, templar, decrypt) for v in value]
    if isinstance(value, EncryptedString) or (isinstance(value, str) and ("{{" in value or "{%" in value)):
        try:
            value = templar.template(value)
        except Exception as exc:  # ansible raises many types; the message is what the user needs
            if not decrypt:
                return VAULTED  # templates over vaulted values cannot be rendered without the password
            raise InventoryError(f"cannot render {value!r}: {exc}") from None
        return _plain(value, templar, decrypt)
    return json.loads(json.dumps(value))


def foreign_files(path: str) -> list[tuple[str, str]]:
    """(path, what to do) for each file or folder in an inventory directory that Ansible's own tools would parse
    as an inventory source although it is clawbot's (clawbot.json, a state directory, model files, deploy results):
    `ansible-inventory -i DIR` turns clawbot.json's objects into groups and a password file into a host name."""
    if not os.path.isdir(path):
        return []
    mine, skipped = re.compile(NOT_INVENTORY), re.compile(ANSIBLE_ALWAYS_SKIPS)
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not skipped.match(d))
        for name in dirs + sorted(files):
            if mine.match(name) and not name.endswith(ANSIBLE_DEFAULT_IGNORE_EXTS):
                where = os.path.join(root, name)
                target = os.path.join(path, CLAWBOT_DIR, os.path.relpath(where, path))
                found.append((where, f"Ansible's own tools (ansible, ansible-inventory) parse every file in an "
                                     f"inventory directory as an inventory source, this one included: move it to "
                                     f"{target} (Ansible skips names that start with a dot) and point the variable "
                                     f"that names it there, if one does (clawbot_config_file, clawbot_state_dir, "
                                     f"clawbot_model_file)"))
        dirs[:] = [d for d in dirs if not mine.match(d)]
    return found


def load_for_command(path: str, vault_password_file: str | None, command: str) -> "Inventory":
    """The inventory for a control-side command (`clawbot status|users|monitoring -i`): unreadable, it says why and
    exits 2; readable, files Ansible would misread are warned about."""
    try:
        inventory = load_inventory(path, vault_password_file)
    except InventoryError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    warn_foreign_files(inventory, command)
    return inventory


def warn_foreign_files(inventory: Inventory, prog: str) -> None:
    """Print foreign_files' advice to stderr, for commands that read an inventory but do not check it."""
    for where, message in inventory.notes:
        print(f"{prog}: warning: {where}: {message}", file=sys.stderr)


_PLUGINS_READY: list = []


def load_inventory(path: str, vault_password_file: str | None = None, decrypt: bool = True) -> Inventory:
    """Read an inventory directory or file; merge variables all < group < host; render templates."""
    if not os.path.exists(path):
        raise InventoryError(f"{path}: no such inventory file or directory")
    os.environ.setdefault("ANSIBLE_INVENTORY_UNPARSED_WARNING", "False")
    os.environ.setdefault("ANSIBLE_LOCALHOST_WARNING", "False")
    notes = foreign_files(path)
    from ansible.inventory import manager as ansible_manager
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.plugins.loader import init_plugin_loader
    from ansible.template import Templar
    from ansible.vars.manager import VariableManager

    if not _PLUGINS_READY:  # lookups in templates (e.g. the default inventory's ansible.builtin.password) need it
        init_plugin_loader()
        # Inventories laid out before CLAWBOT_DIR keep working here (foreign_files tells the user what to move):
        # NOT_INVENTORY joins the names ansible-core skips in a directory source. Set on its compiled pattern, not
        # through ANSIBLE_INVENTORY_IGNORE_REGEX, which counts only if set before ansible is first imported and
        # would leak into the Ansible tools this process starts.
        ansible_manager.IGNORED = re.compile(ansible_manager.IGNORED.pattern + b"|" + NOT_INVENTORY.encode())
        _PLUGINS_READY.append(True)
    loader = DataLoader()
    vault_password_file = vault_password_file or os.environ.get("ANSIBLE_VAULT_PASSWORD_FILE")  # as Ansible does
    if vault_password_file:
        from ansible.parsing.vault import VaultSecretsContext, get_file_vault_secret

        try:
            secret = get_file_vault_secret(filename=vault_password_file, loader=loader)
            secret.load()
        except Exception as exc:
            raise InventoryError(f"{vault_password_file}: cannot read vault password: {exc}") from None
        loader.set_vault_secrets([("default", secret)])
        current = VaultSecretsContext.current(optional=True)
        if current is None:
            VaultSecretsContext.initialize(VaultSecretsContext(secrets=[("default", secret)]))
        else:  # a second inventory in this process (clawbot users, tests): its password, not the first one's
            current.secrets = [("default", secret)]
    else:
        decrypt = False
    try:
        manager = InventoryManager(loader=loader, sources=[path])
    except Exception as exc:
        raise InventoryError(f"{path}: {exc}") from None
    variables = VariableManager(loader=loader, inventory=manager)
    hosts: dict[str, Host] = {}
    for host in manager.get_hosts():
        raw = variables.get_vars(host=host, include_hostvars=False)
        templar = Templar(loader=loader, variables=raw)
        own = {k: v for k, v in raw.items() if k.startswith(("clawbot_", "ansible_", "ssh_"))}
        plain = {}
        for key, value in own.items():
            try:
                plain[key] = _plain(value, templar, decrypt)
            except InventoryError as exc:
                where = _origin(value)
                prefix = f"{where[0]}:{where[1]}:{where[2]}: " if where else ""
                raise InventoryError(f"{prefix}{key}: {exc}") from None
        origins = {k: o for k, v in own.items() if (o := _origin(v))}
        groups = sorted(str(g.name) for g in host.get_groups() if g.name != "all")
        name = str(host.name)  # a plain str, not ansible's tagged one (it reaches YAML and JSON writers)
        hosts[name] = Host(name, groups, plain, origins)
    return Inventory(os.path.abspath(path), hosts, notes)


def _hosts_file(path: str) -> str:
    if os.path.isfile(path):
        return path
    for name in ("hosts.yml", "hosts.yaml", "hosts", "hosts.ini"):
        candidate = os.path.join(path, name)
        if os.path.exists(candidate):
            return candidate
    return path


def check_inventory(path: str, vault_password_file: str | None = None,
                    inventory: Inventory | None = None) -> tuple[CheckResult, InventoryFacts]:
    """Validate every host's clawbot_* / connection variables against schemas/inventory.schema.json.

    Pass an already loaded `inventory` to avoid reading it twice (deploy.py does)."""
    import jsonschema

    if inventory is None:
        inventory = load_inventory(path, vault_password_file, decrypt=False)
    hosts_file = _hosts_file(path)
    result = CheckResult(hosts_file)
    schema = load_schema(INVENTORY_SCHEMA)
    validator = jsonschema.Draft202012Validator(schema)
    seen: set[tuple] = set()

    def add(where, pointer, message, hint="", rule="inventory"):
        file, line, col = where or (hosts_file, 1, 1)
        key = (file, line, col, message)
        if key not in seen:  # a group variable is shared by many hosts: report it once
            seen.add(key)
            result.diagnostics.append(Diagnostic(file, line, col, "error", pointer, message, hint, rule))

    for where, message in inventory.notes:
        result.diagnostics.append(Diagnostic(where, 1, 1, "warning", "", message, rule="inventory-layout"))
    for group in GROUPS:
        if not inventory.group(group):
            add(None, "", f"inventory has no hosts in group '{group}'",
                f"add at least one host under all.children.{group}.hosts")
    addresses: dict[str, str] = {}
    for host in inventory.hosts.values():
        checkable = {k: v for k, v in host.vars.items() if not isinstance(v, Vaulted)}
        for error in validator.iter_errors(checkable):
            parts = list(error.absolute_path)
            if error.validator == "additionalProperties":
                import difflib

                for key in error.instance:
                    if key in schema["properties"] or not key.startswith("clawbot_"):
                        continue
                    close = difflib.get_close_matches(key, list(schema["properties"]), n=1)
                    add(host.origins.get(key), f"/{key}", f"unknown variable '{key}'",
                        f"did you mean '{close[0]}'?" if close else "")
                continue
            key = str(parts[0]) if parts else ""
            pointer = "/" + "/".join(str(p) for p in parts)
            add(host.origins.get(key), pointer, f"{key}: {error.message}")
        address = host.address
        if address in addresses and addresses[address] != host.name:
            add(host.origins.get("clawbot_address") or host.origins.get("ansible_host"), "/clawbot_address",
                f"hosts {addresses[address]} and {host.name} have the same address {address}")
        addresses.setdefault(address, host.name)
    from clawbot.control import split  # model_server.split: rpc_workers and clawbot_rpc_main make sense together

    result.diagnostics.extend(split.topology_diagnostics(inventory, hosts_file))
    result.diagnostics.sort(key=Diagnostic.sort_key)
    return result, inventory.facts()
