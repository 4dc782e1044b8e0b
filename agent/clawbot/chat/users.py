"""`clawbot users`: manage the chat node's accounts and API keys.

On the chat node it opens the database named in clawbot.json (`--config`, default /etc/clawbot/clawbot.json)
next to the running agent (SQLite in WAL mode takes both). Run as root, it first switches to the database's
owner, so no file of the agent's database ever becomes root's. From the control machine, `-i INVENTORY` runs
the same command on every chat node of the inventory over SSH (`--limit HOST` for one), passing passwords on
standard input, never on a command line.

Passwords: `--password-stdin` reads one line; without it, `add` and `reset-password` generate a password and
print it once.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from datetime import datetime, timezone
from pathlib import Path

from clawbot.common.config import NODE_CONFIG_PATH as DEFAULT_CONFIG


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--config", default=None, help=f"clawbot.json of this chat node (default {DEFAULT_CONFIG})")
    where.add_argument("-i", "--inventory", help="run on the inventory's chat nodes over SSH (from the control machine)")
    parser.add_argument("--limit", action="append", default=[], help="with -i: only this chat node (repeatable)")
    parser.add_argument("--vault-password-file", help="with -i: Ansible vault password file")
    parser.add_argument("--json", action="store_true", help="print JSON")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = sub.add_parser("add", help="create an account")
    add.add_argument("name")
    add.add_argument("--role", choices=("user", "admin"), default="user")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    sub.add_parser("list", help="list accounts")
    for name, text in (("disable", "disable an account (its sessions end, its keys stop working)"),
                       ("enable", "enable an account again"), ("remove", "remove an account with its conversations")):
        sub.add_parser(name, help=text).add_argument("name")
    reset = sub.add_parser("reset-password", help="set a new password (every session of the account ends)")
    reset.add_argument("name")
    reset.add_argument("--password-stdin", action="store_true")
    limits = sub.add_parser("set-limits", help="override auth.limits for one account ('default': back to the config)")
    limits.add_argument("name")
    limits.add_argument("--requests-per-minute", metavar="N|default")
    limits.add_argument("--tokens-per-day", metavar="N|default")
    key = sub.add_parser("add-key", help="create an API key for an account (printed once)")
    key.add_argument("name")
    key.add_argument("--key-name", default="", help="what the key is for")
    sub.add_parser("list-keys", help="list an account's API keys").add_argument("name")
    revoke = sub.add_parser("revoke-key", help="revoke an API key by its id")
    revoke.add_argument("name")
    revoke.add_argument("key_id", type=int)


def run(args: argparse.Namespace) -> int:
    if args.inventory:
        from clawbot.control.users import run_on_chat_nodes

        return run_on_chat_nodes(args, _remote_argv(args), _stdin_for(args))
    return run_local(args, sys.stdin)


def _stdin_for(args) -> str | None:
    """The password the remote command reads: from this terminal's stdin, or generated here."""
    if args.command not in ("add", "reset-password"):
        return None
    password = _read_password(sys.stdin) if args.password_stdin else _generated()
    if not args.password_stdin:
        print(f"password for {args.name}: {password}  (shown once)")
    return password + "\n"


def _remote_argv(args) -> list[str]:
    argv = ["--json"] if args.json else []
    argv.append(args.command)
    if args.command in ("add", "reset-password"):
        argv += [args.name, "--password-stdin"] + (["--role", args.role] if args.command == "add" else [])
    elif args.command == "set-limits":
        argv.append(args.name)
        for flag, value in (("--requests-per-minute", args.requests_per_minute), ("--tokens-per-day", args.tokens_per_day)):
            if value is not None:
                argv += [flag, value]
    elif args.command == "add-key":
        argv += [args.name, "--key-name", args.key_name]
    elif args.command == "revoke-key":
        argv += [args.name, str(args.key_id)]
    elif args.command != "list":
        argv.append(args.name)
    return argv


def _generated() -> str:
    return secrets.token_urlsafe(15)


def _read_password(stream) -> str:
    line = stream.readline().rstrip("\r\n")
    if not line:
        raise SystemExit("clawbot users: no password on standard input")
    return line


def _as_database_owner(database: str) -> None:
    """Run as the database's owner when started as root, so the agent can still write every file of it."""
    if os.geteuid() != 0:
        return
    owner = Path(database).parent if not Path(database).exists() else Path(database)
    if not owner.exists():
        return
    st = owner.stat()
    if st.st_uid != 0:
        os.setgroups([])
        os.setgid(st.st_gid)
        os.setuid(st.st_uid)


def _when(ts) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if ts else "never"


def _limit_value(text: str | None, flag: str):
    if text is None or text == "default":
        return None
    try:
        value = int(text)
    except ValueError:
        raise SystemExit(f"clawbot users: {flag} wants a whole number or 'default', not {text!r}") from None
    if value < 0:
        raise SystemExit(f"clawbot users: {flag} must be >= 0 (0: unlimited)")
    return value


def run_local(args: argparse.Namespace, stdin) -> int:
    from clawbot.chat.accounts import AccountError, Accounts
    from clawbot.chat.store import NotFound, Store
    from clawbot.common.config import ConfigError, UnreadableFile, load_config

    config_path = args.config or DEFAULT_CONFIG
    try:
        config = load_config(config_path)
    except (ConfigError, UnreadableFile) as exc:
        print(f"clawbot users: {config_path} is not usable:\n{exc}", file=sys.stderr)
        return 78
    database = config["chat"]["database"]
    _as_database_owner(database)
    accounts = Accounts(Store(database), config["auth"])
    out = (lambda value: print(json.dumps(value, indent=2))) if args.json else None
    try:
        if args.command == "list":
            users = [accounts.public(u) for u in accounts.store.list_users()]
            if out:
                out(users)
            else:
                for u in users:
                    state = "disabled" if u["disabled"] else "enabled"
                    limits = ", ".join(f"{k} {v}" for k, v in u["limits"].items())
                    print(f"{u['name']:<24} {u['role']:<6} {state:<9} last login {_when(u['last_login_at'])}; {limits}"
                          + ("  (override)" if u["limits_override"] else "") + ("  (SSO)" if u["sso"] else ""))
            return 0
        if args.command == "add":
            password = _read_password(stdin) if args.password_stdin else _generated()
            user = accounts.add_user(args.name, password, args.role)
            if out:
                out(accounts.public(user))
            else:
                print(f"created {args.role} {args.name}" + ("" if args.password_stdin else f", password: {password}  (shown once)"))
            return 0
        user = accounts.user(args.name)
        if args.command == "reset-password":
            password = _read_password(stdin) if args.password_stdin else _generated()
            accounts.set_password(user, password)
            print(f"password of {args.name} reset" + ("" if args.password_stdin else f": {password}  (shown once)"))
        elif args.command in ("disable", "enable"):
            accounts.set_disabled(user, args.command == "disable")
            print(f"{args.name} {args.command}d")
        elif args.command == "remove":
            accounts.remove(user)
            print(f"{args.name} removed, with its conversations and keys")
        elif args.command == "set-limits":
            limits = {"requests_per_minute": _limit_value(args.requests_per_minute, "--requests-per-minute"),
                      "tokens_per_day": _limit_value(args.tokens_per_day, "--tokens-per-day")}
            user = accounts.set_limits(user, limits)
            print(f"{args.name}: " + ", ".join(f"{k} {v}" for k, v in accounts.limits_for(user).items()))
        elif args.command == "add-key":
            row, key = accounts.create_key(user, args.key_name)
            if out:
                out(dict(accounts.public_key(row), key=key))
            else:
                print(f"API key {row['id']} for {args.name}: {key}  (shown once)")
        elif args.command == "list-keys":
            keys = [accounts.public_key(r) for r in accounts.store.api_keys(user["id"])]
            if out:
                out(keys)
            else:
                for k in keys:
                    print(f"{k['id']:>5}  {k['prefix']}…  {k['name']:<24} created {_when(k['created_at'])}, "
                          f"last used {_when(k['last_used_at'])}")
        elif args.command == "revoke-key":
            accounts.store.delete_api_key(user["id"], args.key_id)
            print(f"API key {args.key_id} of {args.name} revoked")
        return 0
    except NotFound as exc:
        print(f"clawbot users: no such {'API key' if args.command == 'revoke-key' else 'user'}: {exc.args[0]}",
              file=sys.stderr)
        return 1
    except AccountError as exc:
        print(f"clawbot users: {exc}", file=sys.stderr)
        return 1
    finally:
        accounts.store.close()
