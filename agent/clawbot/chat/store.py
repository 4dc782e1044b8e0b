"""Conversation store: one SQLite file in WAL mode, durable once a call returns.

Durability: every write is one transaction committed with `synchronous=FULL`, so the WAL is fsynced
before commit returns. A message the API has acknowledged therefore survives a SIGKILL of the agent
(WAL alone would already do that: the data sits in the OS page cache) and also a power cut (that is
what FULL adds over NORMAL in WAL mode; at chat rates the extra fsync costs nothing visible).

Schema changes are numbered migrations applied in order, tracked in `PRAGMA user_version`.
Calls are synchronous and serialised by a lock: they take milliseconds, and being synchronous they
still complete inside a `finally` of a cancelled stream (an aborted reply is stored, never lost).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path

# Message status: complete, incomplete (a reply cut short: stream broke, the client left or the person
# stopped it), error (a reply that could not be produced: the text says why), rejected (a user message that
# can never fit the context; kept and shown, but not sent to the model again), cancelled (a user message
# whose wait in line was cancelled before it reached the model; kept and shown, never sent).
STATUSES = ("complete", "incomplete", "error", "rejected", "cancelled")
ROLES = ("user", "assistant", "summary")

MIGRATIONS: list[str] = [
    # 1: conversations, messages (summaries are messages that cover a range), model requests, KB index
    """
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'summary')),
        content TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'complete',
        source TEXT,
        created_at REAL NOT NULL,
        summary_id INTEGER REFERENCES messages(id),
        covers_from INTEGER,
        covers_to INTEGER,
        meta TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
    CREATE TABLE model_requests (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        message_id INTEGER,
        kind TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        budget INTEGER NOT NULL,
        reported_prompt_tokens INTEGER,
        outcome TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL
    );
    CREATE INDEX requests_by_conversation ON model_requests(conversation_id, id);
    CREATE TABLE kb_files (
        path TEXT PRIMARY KEY,
        mtime_ns INTEGER NOT NULL,
        size INTEGER NOT NULL
    );
    CREATE VIRTUAL TABLE kb_passages USING fts5(
        content, heading, source UNINDEXED, tokenize = 'unicode61 remove_diacritics 2'
    );
    """,
    # 2: accounts. Conversations get an owner; those made before accounts existed have none and are handed to
    # the first admin when it is created (Store.create_user), so nothing is lost and nothing is shown to anybody
    # in between. Sessions keep only a SHA-256 of their 256-bit token; API keys an argon2id hash of their secret.
    """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE COLLATE NOCASE,
        role TEXT NOT NULL CHECK (role IN ('admin', 'user')),
        password_hash TEXT,
        disabled INTEGER NOT NULL DEFAULT 0,
        sso_issuer TEXT,
        sso_subject TEXT,
        requests_per_minute INTEGER,
        tokens_per_day INTEGER,
        created_at REAL NOT NULL,
        last_login_at REAL,
        UNIQUE (sso_issuer, sso_subject)
    );
    CREATE TABLE sessions (
        token_hash TEXT PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        csrf_token TEXT NOT NULL,
        address TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        last_seen_at REAL NOT NULL
    );
    CREATE TABLE api_keys (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        prefix TEXT NOT NULL UNIQUE,
        secret_hash TEXT NOT NULL,
        created_at REAL NOT NULL,
        last_used_at REAL
    );
    CREATE TABLE usage (
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        day TEXT NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (user_id, day)
    );
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    ALTER TABLE conversations ADD COLUMN owner_id INTEGER REFERENCES users(id);
    CREATE INDEX conversations_by_owner ON conversations(owner_id, updated_at)
    """,
]


class NotFound(KeyError):
    pass


def _now() -> float:
    return time.time()


class Store:
    """The chat node's database. One instance per process; safe to call from any thread."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    # ------------------------------------------------------------------ plumbing

    def _migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise RuntimeError(f"{self.path}: database schema version {version} is newer than this clawbot "
                                   f"({len(MIGRATIONS)}); upgrade clawbot or restore an older database")
            for number in range(version, len(MIGRATIONS)):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in MIGRATIONS[number].split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {number + 1}")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    def schema_version(self) -> int:
        with self._lock:
            return self._db.execute("PRAGMA user_version").fetchone()[0]

    def _tx(self, fn):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._db)
                self._db.execute("COMMIT")
                return result
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def ping(self) -> bool:
        self._query("SELECT 1")
        return True

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ conversations

    def create_conversation(self, title: str = "", owner_id: int | None = None) -> dict:
        now = _now()
        conv_id = uuid.uuid4().hex
        title = title.strip() or "New conversation"
        self._tx(lambda db: db.execute(
            "INSERT INTO conversations (id, title, created_at, updated_at, owner_id) VALUES (?, ?, ?, ?, ?)",
            (conv_id, title, now, now, owner_id)))
        return self.get_conversation(conv_id)

    def list_conversations(self, owner_id: int) -> list[dict]:
        rows = self._query(
            "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id AND m.role != 'summary') AS message_count"
            " FROM conversations c WHERE c.owner_id = ? ORDER BY c.updated_at DESC, c.id", (owner_id,))
        return [dict(r) for r in rows]

    def get_conversation(self, conv_id: str, owner_id: int | None = None) -> dict:
        """The conversation; NotFound also when owner_id is given and it belongs to someone else."""
        rows = self._query("SELECT * FROM conversations WHERE id = ?", (conv_id,))
        if not rows or (owner_id is not None and rows[0]["owner_id"] != owner_id):
            raise NotFound(conv_id)
        return dict(rows[0])

    def rename_conversation(self, conv_id: str, title: str) -> None:
        self._tx(lambda db: db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conv_id)))

    def delete_conversation(self, conv_id: str, owner_id: int | None = None) -> None:
        def run(db):
            row = db.execute("SELECT owner_id FROM conversations WHERE id = ?", (conv_id,)).fetchone()
            if row is None or (owner_id is not None and row["owner_id"] != owner_id):
                raise NotFound(conv_id)
            _delete_conversation(db, conv_id)
        self._tx(run)

    # ------------------------------------------------------------------ messages

    def add_message(self, conv_id: str, role: str, content: str, *, status: str = "complete",
                    source: str | None = None, meta: dict | None = None) -> dict:
        assert role in ROLES and status in STATUSES

        def run(db):
            if db.execute("SELECT 1 FROM conversations WHERE id = ?", (conv_id,)).fetchone() is None:
                raise NotFound(conv_id)
            now = _now()
            cur = db.execute(
                "INSERT INTO messages (conversation_id, role, content, status, source, created_at, meta)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (conv_id, role, content, status, source, now, json.dumps(meta or {})))
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conv_id))
            return cur.lastrowid
        return self.get_message(self._tx(run))

    def update_message(self, message_id: int, *, content: str | None = None, status: str | None = None,
                       source: str | None = None, meta: dict | None = None) -> dict:
        sets, args = [], []
        for column, value in (("content", content), ("status", status), ("source", source)):
            if value is not None:
                sets.append(f"{column} = ?")
                args.append(value)
        if meta is not None:
            sets.append("meta = ?")
            args.append(json.dumps(meta))
        if sets:
            self._tx(lambda db: db.execute(f"UPDATE messages SET {', '.join(sets)} WHERE id = ?", (*args, message_id)))
        return self.get_message(message_id)

    def get_message(self, message_id: int) -> dict:
        rows = self._query("SELECT * FROM messages WHERE id = ?", (message_id,))
        if not rows:
            raise NotFound(message_id)
        return _message(rows[0])

    def messages(self, conv_id: str) -> list[dict]:
        """Every message of a conversation, oldest first (summarised ones included, with summary_id set)."""
        return [_message(r) for r in self._query(
            "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conv_id,))]

    def remove_replies_after(self, conv_id: str, message_id: int) -> list[int]:
        """Delete the assistant messages after `message_id` (a regenerated answer replaces them); their ids."""
        def run(db):
            ids = [r["id"] for r in db.execute(
                "SELECT id FROM messages WHERE conversation_id = ? AND id > ? AND role = 'assistant' "
                "AND summary_id IS NULL ORDER BY id", (conv_id, message_id))]
            db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in ids])
            return ids
        return self._tx(run)

    def active_messages(self, conv_id: str) -> list[dict]:
        """What the model sees: messages not covered by a summary, summaries in place of what they cover."""
        rows = [_message(r) for r in self._query(
            "SELECT * FROM messages WHERE conversation_id = ? AND summary_id IS NULL", (conv_id,))]
        return sorted(rows, key=lambda m: (m["covers_from"] if m["role"] == "summary" else m["id"], m["id"]))

    def add_summary(self, conv_id: str, content: str, covered_ids: list[int], meta: dict | None = None) -> dict:
        """Store a summary and mark the messages it replaces, in one transaction."""
        assert covered_ids

        def run(db):
            now = _now()
            cur = db.execute(
                "INSERT INTO messages (conversation_id, role, content, status, source, created_at, covers_from, covers_to, meta)"
                " VALUES (?, 'summary', ?, 'complete', 'model', ?, ?, ?, ?)",
                (conv_id, content, now, min(covered_ids), max(covered_ids), json.dumps(meta or {})))
            summary_id = cur.lastrowid
            db.executemany("UPDATE messages SET summary_id = ? WHERE id = ? AND conversation_id = ?",
                           [(summary_id, mid, conv_id) for mid in covered_ids])
            return summary_id
        return self.get_message(self._tx(run))

    # ------------------------------------------------------------------ model requests

    def record_request(self, conv_id: str, kind: str, prompt_tokens: int, budget: int,
                       message_id: int | None = None) -> int:
        return self._tx(lambda db: db.execute(
            "INSERT INTO model_requests (conversation_id, message_id, kind, prompt_tokens, budget, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)", (conv_id, message_id, kind, prompt_tokens, budget, _now())).lastrowid)

    def finish_request(self, request_id: int, outcome: str, reported_prompt_tokens: int | None = None,
                       message_id: int | None = None) -> None:
        self._tx(lambda db: db.execute(
            "UPDATE model_requests SET outcome = ?, reported_prompt_tokens = COALESCE(?, reported_prompt_tokens),"
            " message_id = COALESCE(?, message_id) WHERE id = ?",
            (outcome, reported_prompt_tokens, message_id, request_id)))

    def requests(self, conv_id: str) -> list[dict]:
        return [dict(r) for r in self._query(
            "SELECT * FROM model_requests WHERE conversation_id = ? ORDER BY id", (conv_id,))]

    # ------------------------------------------------------------------ accounts (policy lives in clawbot.chat.accounts)

    def create_user(self, name: str, role: str, password_hash: str | None, *, sso: tuple[str, str] | None = None) -> dict:
        """A new account; the first admin also receives every conversation made before accounts existed."""
        def run(db):
            cur = db.execute(
                "INSERT INTO users (name, role, password_hash, sso_issuer, sso_subject, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (name, role, password_hash, *(sso or (None, None)), _now()))
            if role == "admin":
                db.execute("UPDATE conversations SET owner_id = ? WHERE owner_id IS NULL", (cur.lastrowid,))
            return cur.lastrowid
        return self.get_user(self._tx(run))

    def get_user(self, user_id: int) -> dict:
        rows = self._query("SELECT * FROM users WHERE id = ?", (user_id,))
        if not rows:
            raise NotFound(user_id)
        return dict(rows[0])

    def find_user(self, name: str) -> dict | None:
        rows = self._query("SELECT * FROM users WHERE name = ?", (name,))
        return dict(rows[0]) if rows else None

    def find_sso_user(self, issuer: str, subject: str) -> dict | None:
        rows = self._query("SELECT * FROM users WHERE sso_issuer = ? AND sso_subject = ?", (issuer, subject))
        return dict(rows[0]) if rows else None

    def list_users(self) -> list[dict]:
        return [dict(r) for r in self._query("SELECT * FROM users ORDER BY name")]

    def update_user(self, user_id: int, keep_session: str | None = None, **columns) -> dict:
        """Set the given columns (role, password_hash, disabled, requests_per_minute, tokens_per_day, last_login_at).
        A new password or disabling ends the account's sessions (but `keep_session`, a token hash)."""
        allowed = {"role", "password_hash", "disabled", "requests_per_minute", "tokens_per_day", "last_login_at"}
        if not columns or not set(columns) <= allowed:  # column names go into the SQL text: never from input
            raise ValueError(f"update_user: not updatable: {sorted(set(columns) - allowed) or 'nothing'}")

        def run(db):
            db.execute(f"UPDATE users SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?",
                       (*columns.values(), user_id))
            if columns.get("role") == "admin":
                db.execute("UPDATE conversations SET owner_id = ? WHERE owner_id IS NULL", (user_id,))
            if columns.get("disabled") or "password_hash" in columns:
                db.execute("DELETE FROM sessions WHERE user_id = ? AND token_hash != ?", (user_id, keep_session or ""))
        self._tx(run)
        return self.get_user(user_id)

    def delete_user(self, user_id: int) -> None:
        """The account with its conversations, sessions, keys and usage."""
        def run(db):
            for row in db.execute("SELECT id FROM conversations WHERE owner_id = ?", (user_id,)).fetchall():
                _delete_conversation(db, row["id"])
            if db.execute("DELETE FROM users WHERE id = ?", (user_id,)).rowcount == 0:
                raise NotFound(user_id)
        self._tx(run)

    def count_admins(self, enabled_only: bool = True) -> int:
        sql = "SELECT COUNT(*) FROM users WHERE role = 'admin'" + (" AND disabled = 0" if enabled_only else "")
        return self._query(sql)[0][0]

    def add_session(self, token_hash: str, user_id: int, csrf_token: str, address: str) -> None:
        now = _now()
        self._tx(lambda db: db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)",
                                       (token_hash, user_id, csrf_token, address, now, now)))

    def get_session(self, token_hash: str) -> dict | None:
        rows = self._query("SELECT * FROM sessions WHERE token_hash = ?", (token_hash,))
        return dict(rows[0]) if rows else None

    def touch_session(self, token_hash: str, when: float) -> None:
        self._tx(lambda db: db.execute("UPDATE sessions SET last_seen_at = ? WHERE token_hash = ?", (when, token_hash)))

    def delete_session(self, token_hash: str) -> None:
        self._tx(lambda db: db.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash,)))

    def delete_sessions_before(self, created_before: float, seen_before: float) -> int:
        return self._tx(lambda db: db.execute("DELETE FROM sessions WHERE created_at < ? OR last_seen_at < ?",
                                              (created_before, seen_before)).rowcount)

    def add_api_key(self, user_id: int, name: str, prefix: str, secret_hash: str) -> dict:
        key_id = self._tx(lambda db: db.execute(
            "INSERT INTO api_keys (user_id, name, prefix, secret_hash, created_at) VALUES (?, ?, ?, ?, ?)",
            (user_id, name, prefix, secret_hash, _now())).lastrowid)
        return dict(self._query("SELECT * FROM api_keys WHERE id = ?", (key_id,))[0])

    def api_key_by_prefix(self, prefix: str) -> dict | None:
        rows = self._query("SELECT * FROM api_keys WHERE prefix = ?", (prefix,))
        return dict(rows[0]) if rows else None

    def api_keys(self, user_id: int) -> list[dict]:
        return [dict(r) for r in self._query("SELECT * FROM api_keys WHERE user_id = ? ORDER BY id", (user_id,))]

    def touch_api_key(self, key_id: int, when: float) -> None:
        self._tx(lambda db: db.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (when, key_id)))

    def delete_api_key(self, user_id: int, key_id: int) -> None:
        def run(db):
            if db.execute("DELETE FROM api_keys WHERE id = ? AND user_id = ?", (key_id, user_id)).rowcount == 0:
                raise NotFound(key_id)
        self._tx(run)

    def add_usage(self, user_id: int, day: str, requests: int = 0, prompt_tokens: int = 0,
                  completion_tokens: int = 0) -> None:
        self._tx(lambda db: db.execute(
            "INSERT INTO usage VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id, day) DO UPDATE SET"
            " requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
            " completion_tokens = completion_tokens + excluded.completion_tokens",
            (user_id, day, requests, prompt_tokens, completion_tokens)))

    def usage(self, user_id: int, day: str) -> dict:
        rows = self._query("SELECT requests, prompt_tokens, completion_tokens FROM usage WHERE user_id = ? AND day = ?",
                           (user_id, day))
        return dict(rows[0]) if rows else {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def usage_totals(self) -> list[dict]:
        """Every account's usage summed over all days (for /metrics counters)."""
        return [dict(r) for r in self._query(
            "SELECT u.name, COALESCE(SUM(s.requests), 0) AS requests, COALESCE(SUM(s.prompt_tokens), 0) AS prompt_tokens,"
            " COALESCE(SUM(s.completion_tokens), 0) AS completion_tokens FROM users u LEFT JOIN usage s ON s.user_id = u.id"
            " GROUP BY u.id ORDER BY u.name")]

    def get_setting(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM settings WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_setting(self, key: str, value: str) -> None:
        self._tx(lambda db: db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value)))

    # ------------------------------------------------------------------ knowledge-base index (used by fallbacks)

    def kb_files(self) -> dict[str, tuple[int, int]]:
        return {r["path"]: (r["mtime_ns"], r["size"]) for r in self._query("SELECT * FROM kb_files")}

    def kb_replace_file(self, path: str, mtime_ns: int, size: int, passages: list[tuple[str, str]]) -> None:
        def run(db):
            db.execute("DELETE FROM kb_passages WHERE source = ?", (path,))
            db.executemany("INSERT INTO kb_passages (content, heading, source) VALUES (?, ?, ?)",
                           [(content, heading, path) for heading, content in passages])
            db.execute("INSERT OR REPLACE INTO kb_files VALUES (?, ?, ?)", (path, mtime_ns, size))
        self._tx(run)

    def kb_remove_file(self, path: str) -> None:
        def run(db):
            db.execute("DELETE FROM kb_passages WHERE source = ?", (path,))
            db.execute("DELETE FROM kb_files WHERE path = ?", (path,))
        self._tx(run)

    def kb_search(self, match: str, limit: int) -> list[dict]:
        return [dict(r) for r in self._query(
            "SELECT content, heading, source, bm25(kb_passages, 1.0, 2.0) AS rank FROM kb_passages"
            " WHERE kb_passages MATCH ? ORDER BY rank LIMIT ?", (match, limit))]


def _delete_conversation(db: sqlite3.Connection, conv_id: str) -> None:
    db.execute("UPDATE messages SET summary_id = NULL WHERE conversation_id = ?", (conv_id,))
    db.execute("DELETE FROM messages WHERE conversation_id = ?", (conv_id,))
    db.execute("DELETE FROM model_requests WHERE conversation_id = ?", (conv_id,))
    db.execute("DELETE FROM conversations WHERE id = ?", (conv_id,))


def _message(row: sqlite3.Row) -> dict:
    message = dict(row)
    message["meta"] = json.loads(message["meta"] or "{}")
    return message
