"""Conversation history in SQLite: what the terminal app's sidebar lists.

    store = HistoryStore()                        # $HANLIN_HOME/history.sqlite
    cid = store.create("Capitals", system="Be brief.")
    store.add_message(cid, "user", "What is the capital of France?")
    store.add_message(cid, "assistant", "Paris.", stats={"tokens_per_s": 61.2})
    for c in store.list(): print(c.id, c.title, c.updated)
    store.export_markdown(cid, "capitals.md")

Every write is one transaction, so a locked database or a full disk loses nothing already
saved: the failed write rolls back and raises HistoryError with what went wrong and what to do;
the conversations written before are untouched. WAL journaling lets a second hanlin (or a
reader such as `sqlite3`) look at the file while the app writes it. Exports go through a
temporary file renamed into place.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

__all__ = ["HistoryStore", "HistoryError", "Conversation", "Message", "default_path", "to_markdown"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id       INTEGER PRIMARY KEY,
    title    TEXT NOT NULL,
    system   TEXT NOT NULL DEFAULT '',
    model    TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL DEFAULT '{}',   -- JSON: the sampling settings used
    created  REAL NOT NULL,
    updated  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id              INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role            TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content         TEXT NOT NULL,
    stats           TEXT NOT NULL DEFAULT '{}',  -- JSON: tokens, tokens/s, stopped
    created         REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""


class HistoryError(RuntimeError):
    """A history write or read failed; the message says why (locked, full disk, not a database)."""


@dataclass
class Message:
    role: str
    content: str
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Conversation:
    id: int
    title: str
    system: str = ""
    model: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0
    messages: list[Message] = field(default_factory=list)


def default_path() -> Path:
    from hanlin.catalog import hanlin_home

    return hanlin_home() / "history.sqlite"


def _explain(path: Path, e: sqlite3.Error) -> str:
    text = str(e)
    low = text.lower()
    if "locked" in low or "busy" in low:
        why = "the database is locked by another program; close it (or wait) and try again"
    elif "full" in low or "disk i/o" in low:
        why = "the disk is full; free some space and try again"
    elif "not a database" in low or "malformed" in low:
        why = "the file is not a hanlin history database (move it away to start a new one)"
    elif "readonly" in low or "read-only" in low:
        why = "the file is read-only"
    else:
        why = text
    return f"history {path}: {why} ({text}); nothing saved before was lost"


class HistoryStore:
    """Conversations and their messages in one SQLite file. Thread-safe: each call opens its own
    short transaction on a connection made for the calling thread's use."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, timeout: float = 2.0):
        self.path = Path(path) if path is not None else default_path()
        self.timeout = timeout
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = self._connect()
            try:
                db.executescript(SCHEMA)  # CREATE ... IF NOT EXISTS, in its own transaction
            finally:
                db.close()
        except sqlite3.Error as e:
            raise HistoryError(_explain(self.path, e)) from None
        except OSError as e:
            raise HistoryError(f"history {self.path}: cannot create its folder ({e.strerror})") from None

    # -- connections -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA foreign_keys = ON")
        try:
            db.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError:
            pass  # a locked database cannot switch modes now; the default journal is just as safe
        return db

    class _Tx:
        def __init__(self, store: "HistoryStore"):
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            try:
                self.db = self.store._connect()
                self.db.execute("BEGIN IMMEDIATE")  # take the write lock now, not halfway through
            except sqlite3.Error as e:
                raise HistoryError(_explain(self.store.path, e)) from None
            return self.db

        def __exit__(self, kind, exc, tb) -> bool:
            try:
                if kind is None:
                    try:
                        self.db.execute("COMMIT")
                    except sqlite3.Error as e:
                        exc = e
                if exc is not None:
                    try:  # SQLite may have rolled back already (SQLITE_FULL does): nothing to undo then
                        self.db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
            finally:
                self.db.close()
            if isinstance(exc, sqlite3.Error):
                raise HistoryError(_explain(self.store.path, exc)) from None
            return False

    def _tx(self) -> "HistoryStore._Tx":
        return HistoryStore._Tx(self)

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            db = self._connect()
            try:
                return db.execute(sql, args).fetchall()
            finally:
                db.close()
        except sqlite3.Error as e:
            raise HistoryError(_explain(self.path, e)) from None

    # -- conversations -----------------------------------------------------------------

    def create(self, title: str, *, system: str = "", model: str = "", settings: dict[str, Any] | None = None) -> int:
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO conversations (title, system, model, settings, created, updated) VALUES (?, ?, ?, ?, ?, ?)",
                (_title(title), system, model, json.dumps(settings or {}), now, now),
            )
            return int(cur.lastrowid)

    def list(self) -> list[Conversation]:
        """All conversations, the most recently updated first (messages not loaded)."""
        rows = self._read("SELECT id, title, system, model, settings, created, updated FROM conversations ORDER BY updated DESC, id DESC")
        return [Conversation(r[0], r[1], r[2], r[3], json.loads(r[4] or "{}"), r[5], r[6]) for r in rows]

    def get(self, conversation_id: int) -> Conversation:
        rows = self._read("SELECT id, title, system, model, settings, created, updated FROM conversations WHERE id = ?", (conversation_id,))
        if not rows:
            raise HistoryError(f"history {self.path}: no conversation {conversation_id}")
        r = rows[0]
        conv = Conversation(r[0], r[1], r[2], r[3], json.loads(r[4] or "{}"), r[5], r[6])
        conv.messages = [Message(m[0], m[1], json.loads(m[2] or "{}")) for m in
                         self._read("SELECT role, content, stats FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,))]  # fmt: skip
        return conv

    def add_message(self, conversation_id: int, role: str, content: str, *, stats: dict[str, Any] | None = None) -> None:
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message role must be system, user or assistant, not {role!r}")
        now = time.time()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
                raise HistoryError(f"history {self.path}: no conversation {conversation_id}")
            db.execute("INSERT INTO messages (conversation_id, role, content, stats, created) VALUES (?, ?, ?, ?, ?)",
                       (conversation_id, role, content, json.dumps(stats or {}), now))  # fmt: skip
            db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id))

    def update(self, conversation_id: int, *, title: str | None = None, system: str | None = None,
               settings: dict[str, Any] | None = None) -> None:  # fmt: skip
        sets, args = [], []
        if title is not None:
            sets.append("title = ?")
            args.append(_title(title))
        if system is not None:
            sets.append("system = ?")
            args.append(system)
        if settings is not None:
            sets.append("settings = ?")
            args.append(json.dumps(settings))
        if not sets:
            return
        with self._tx() as db:
            cur = db.execute(f"UPDATE conversations SET {', '.join(sets)} WHERE id = ?", (*args, conversation_id))
            if cur.rowcount == 0:
                raise HistoryError(f"history {self.path}: no conversation {conversation_id}")

    def rename(self, conversation_id: int, title: str) -> None:
        self.update(conversation_id, title=title)

    def delete(self, conversation_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def export_markdown(self, conversation_id: int, path: str | os.PathLike[str]) -> Path:
        """Write the conversation as Markdown to path (atomically) and return the path."""
        out = Path(path)
        text = to_markdown(self.get(conversation_id))
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return out

    def __iter__(self) -> Iterator[Conversation]:
        return iter(self.list())


def _title(title: str) -> str:
    title = " ".join(title.split())
    if not title:
        raise ValueError("a conversation title cannot be empty")
    return title[:120]


def to_markdown(conv: Conversation) -> str:
    lines = [f"# {conv.title}", ""]
    if conv.model:
        lines += [f"_model: {conv.model}_", ""]
    if conv.system:
        lines += ["**System:** " + conv.system, ""]
    for m in conv.messages:
        who = {"user": "You", "assistant": "Assistant", "system": "System"}[m.role]
        lines += [f"## {who}", "", m.content.rstrip(), ""]
    return "\n".join(lines).rstrip() + "\n"
