"""`clawbot kb`: the chat node's knowledge base, the documents the `knowledge_base` fallback answers from.

    clawbot kb [--config F] [--json] add FILE... [--replace]
    clawbot kb [--config F] [--json] list
    clawbot kb [--config F] remove NAME...

Runs on the chat node, like `clawbot users`: it reads clawbot.json (`--config`, default
/etc/clawbot/clawbot.json) for chat.knowledge_base.directory and chat.database, and works on the same SQLite
database as the running agent (WAL mode), so the agent answers from a document the moment `add` returns and
stops quoting it the moment `remove` returns. Run as root, it reads the files to add first, then switches to
the database's owner (the agent's user) before it writes anything.

`add` copies each file into the directory (Markdown, text, PDF; by name, no sub-folders) and indexes it;
every file is read and parsed before anything is written, so one bad file (missing, unsupported type,
unreadable or scanned PDF, text that is not UTF-8) changes nothing and exits 1 with the file named. `list`
rescans the directory first (files copied there by hand count too) and names files it cannot index.
`remove` deletes a document's file and its passages. The starter documents deploy installs live in the
`clawbot/` sub-folder: deploy owns them (it renders them from the inventory and rewrites them on drift), so
`remove` refuses them; deploy never touches any other file of the directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path, PurePosixPath

from clawbot.common.config import NODE_CONFIG_PATH as DEFAULT_CONFIG

# The sub-folder of the knowledge directory that deploy fills with the starter documents (roles/chat.py).
STARTER_FOLDER = "clawbot"
PROG = "clawbot kb"


class KbError(Exception):
    """Bad input; nothing was changed. The message names the file."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help=f"clawbot.json of this chat node (default {DEFAULT_CONFIG})")
    parser.add_argument("--json", action="store_true", help="print JSON")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = sub.add_parser("add", help="copy documents (.md, .markdown, .txt, .pdf) into the knowledge base and index them")
    add.add_argument("files", nargs="+", metavar="FILE")
    add.add_argument("--replace", action="store_true", help="replace a document of the same name")
    sub.add_parser("list", help="list the documents with their passage counts")
    remove = sub.add_parser("remove", help="delete documents (their files and passages), by the name `list` shows")
    remove.add_argument("names", nargs="+", metavar="NAME")


def run(args: argparse.Namespace) -> int:
    from clawbot.common.config import ConfigError, UnreadableFile, load_config

    config_path = args.config or DEFAULT_CONFIG
    try:
        config = load_config(config_path)
    except (ConfigError, UnreadableFile) as exc:
        print(f"{PROG}: {config_path} is not usable:\n{exc}", file=sys.stderr)
        return 78
    import sqlite3

    directory = Path(config["chat"]["knowledge_base"]["directory"])
    try:
        if args.command == "add":
            return _add(args, config, directory)
        if args.command == "remove":
            return _remove(args, config, directory)
        return _list(args, config, directory)
    except KbError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except (OSError, sqlite3.Error) as exc:  # the database or the directory, not the documents given
        where = getattr(exc, "filename", None) or config["chat"]["database"]
        print(f"{PROG}: {where}: {getattr(exc, 'strerror', None) or exc} (run it as root or as the agent's user)",
              file=sys.stderr)
        return 1


def _knowledge_base(config: dict):
    from clawbot.chat.fallbacks import KnowledgeBase
    from clawbot.chat.store import Store
    from clawbot.chat.users import _as_database_owner

    _as_database_owner(config["chat"]["database"])
    kb = config["chat"]["knowledge_base"]
    return KnowledgeBase(Store(config["chat"]["database"]), kb["directory"], kb["max_passages"])


# ---------------------------------------------------------------------------------------------- add


def _read_documents(files: list[str], directory: Path, replace: bool) -> list[tuple[Path, str, bytes, list]]:
    """(source, name in the directory, bytes, passages) for every file, or KbError before anything is written."""
    from clawbot.chat.fallbacks import KB_SUFFIXES, DocumentError, document_passages

    documents, names = [], {}
    for given in files:
        source = Path(given)
        if not source.exists():
            raise KbError(f"{given}: no such file (nothing was added)")
        if not source.is_file():
            raise KbError(f"{given}: not a regular file (nothing was added)")
        name = source.name
        if name.startswith("."):
            raise KbError(f"{given}: hidden files are not indexed; rename it (nothing was added)")
        if source.suffix.lower() not in KB_SUFFIXES:
            raise KbError(f"{given}: unsupported type {source.suffix or '(no suffix)'!r}: clawbot kb takes "
                          f"{', '.join(KB_SUFFIXES)} (nothing was added)")
        if name in names:
            raise KbError(f"{given}: same name as {names[name]}; both would be {directory / name} (nothing was added)")
        names[name] = given
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise KbError(f"{given}: cannot read it ({exc.strerror or exc}) (nothing was added)") from None
        try:
            passages = document_passages(data, given, source.stem)
        except DocumentError as exc:
            raise KbError(f"{exc} (nothing was added)") from None
        if not passages:
            raise KbError(f"{given}: no text in it (nothing was added)")
        dest = directory / name
        same_file = dest.exists() and source.resolve() == dest.resolve()
        if dest.exists() and not replace and not same_file:
            raise KbError(f"{given}: {dest} is already in the knowledge base; pass --replace to replace it "
                          "(nothing was added)")
        documents.append((source, name, data, passages))
    return documents


def _add(args, config: dict, directory: Path) -> int:
    documents = _read_documents(args.files, directory, args.replace)  # as the invoking user: root may read anything
    kb = _knowledge_base(config)  # from here on as the database's owner
    try:
        if not directory.is_dir():
            if directory.exists():
                raise KbError(f"{directory} (chat.knowledge_base.directory) is not a directory (nothing was added)")
            try:
                directory.mkdir(mode=0o750)
            except OSError as exc:
                raise KbError(f"cannot create {directory} (chat.knowledge_base.directory): {exc.strerror or exc}; "
                              "deploy creates it (nothing was added)") from None
        staged = []  # (temporary copy or None for a file already in place, destination, passages)
        try:
            for source, name, data, passages in documents:
                dest = directory / name
                if dest.exists() and source.resolve() == dest.resolve():
                    staged.append((None, dest, passages))
                    continue
                temp = directory / f".{name}.kb-add"  # hidden: the agent's rescan skips it
                staged.append((temp, dest, passages))
                with open(temp, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(temp, 0o640)
        except OSError as exc:
            for temp, _, _ in staged:
                if temp is not None:
                    temp.unlink(missing_ok=True)
            raise KbError(f"cannot write into {directory}: {exc.strerror or exc} (nothing was added)") from None
        added = []
        for temp, dest, passages in staged:
            if temp is not None:
                os.replace(temp, dest)
            st = dest.stat()
            kb.store.kb_replace_file(dest.name, st.st_mtime_ns, st.st_size, passages)
            added.append({"path": dest.name, "passages": len(passages)})
    finally:
        kb.store.close()
    if args.json:
        print(json.dumps(added, indent=2))
    else:
        for doc in added:
            print(f"added {doc['path']}: {doc['passages']} passage(s)")
    return 0


# ---------------------------------------------------------------------------------------------- list


def _list(args, config: dict, directory: Path) -> int:
    kb = _knowledge_base(config)
    try:
        kb.refresh(force=True)
        documents = kb.documents()
        problems = [{"path": path, "reason": reason} for path, (_, reason) in sorted(kb.failed.items())]
        problem = kb.problem()
    finally:
        kb.store.close()
    if args.json:
        print(json.dumps({"directory": str(directory), "documents": documents, "not_indexed": problems,
                          "problem": problem}, indent=2))
        return 0
    print(f"knowledge base {directory}: {len(documents)} document(s), "
          f"{sum(d['passages'] for d in documents)} passage(s)")
    for doc in documents:
        starter = "  (starter document, kept by deploy)" if _is_starter(doc["path"]) else ""
        print(f"  {doc['path']:<40} {doc['passages']:>5} passage(s){starter}")
    for item in problems:
        print(f"  not indexed: {item['reason']}")
    if problem:
        print(f"the knowledge_base fallback cannot answer: {problem}")
    return 0


# ---------------------------------------------------------------------------------------------- remove


def _is_starter(rel: str) -> bool:
    return PurePosixPath(rel).parts[:1] == (STARTER_FOLDER,)


def _remove(args, config: dict, directory: Path) -> int:
    kb = _knowledge_base(config)
    try:
        indexed = kb.store.kb_files()
        targets = []
        for name in args.names:
            rel = PurePosixPath(name)
            if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                raise KbError(f"{name}: name a document as `clawbot kb list` shows it, relative to {directory} "
                              "(nothing was removed)")
            if _is_starter(str(rel)):
                raise KbError(f"{name}: a starter document; deploy installs it and would put it back, so it is not "
                              f"removed (edit roles/files/knowledge/ in the clawbot checkout instead; nothing was removed)")
            path = directory / rel
            if str(rel) not in indexed and not path.is_file():
                raise KbError(f"{name}: no such document in {directory} (see `clawbot kb list`; nothing was removed)")
            targets.append((str(rel), path))
        removed = []
        for rel, path in targets:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise KbError(f"{rel}: cannot delete {path}: {exc.strerror or exc}") from None
            kb.store.kb_remove_file(rel)
            removed.append(rel)
    finally:
        kb.store.close()
    if args.json:
        print(json.dumps(removed, indent=2))
    else:
        for rel in removed:
            print(f"removed {rel}")
    return 0
