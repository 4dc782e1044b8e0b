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
from dataclasses import dataclass, field

from clawbot.common.config import CheckResult, Diagnostic, InventoryFacts, load_schema

INVENTORY_SCHEMA = "inventory.schema.json"
GROUPS = ("chat_nodes", "model_nodes")


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


_PLUGINS_READY: list = []


def load_inventory(path: str, vault_password_file: str | None = None, decrypt: bool = True) -> Inventory:
    """Read an inventory directory or file; merge variables all < group < host; render templates."""
    if not os.path.exists(path):
        raise InventoryError(f"{path}: no such inventory file or directory")
    os.environ.setdefault("ANSIBLE_INVENTORY_UNPARSED_WARNING", "False")
    os.environ.setdefault("ANSIBLE_LOCALHOST_WARNING", "False")
    # clawbot.json, model files and the CA state dir often sit beside hosts.yml: not inventory sources.
    os.environ.setdefault("ANSIBLE_INVENTORY_IGNORE_REGEX", r"^(clawbot.*\.json|.*\.gguf|models|state|result.*\.json)$")
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.plugins.loader import init_plugin_loader
    from ansible.template import Templar
    from ansible.vars.manager import VariableManager

    if not _PLUGINS_READY:  # lookups in templates (e.g. the default inventory's ansible.builtin.password) need it
        init_plugin_loader()
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
        groups = sorted(g.name for g in host.get_groups() if g.name != "all")
        hosts[host.name] = Host(host.name, groups, plain, origins)
    return Inventory(os.path.abspath(path), hosts)


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
    result.diagnostics.sort(key=Diagnostic.sort_key)
    return result, inventory.facts()
