"""Every model answer, kept as it arrives, so an interrupted run resumes where it stopped.

One SQLite file per run folder (`answers.sqlite`): key = sha256 of the request (kind, the
prompt text, the continuation or the generation settings), value = the answer as JSON. Each
batch of answers is one transaction, so a kill loses at most the batch in flight. The model's
identity (path, engine, device, chat template) is stored once; a folder holding another
model's answers is refused rather than silently mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from typing import Any, Iterable

from hanlin.backends.base import ConfigError


def request_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


class AnswerCache:
    def __init__(self, path: str | None, identity: dict[str, Any]):
        self.path = path
        self.hits = 0
        self._mem: dict[str, Any] = {}
        self._db = None
        if path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30)
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        row = self._db.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()
        want = json.dumps(identity, sort_keys=True)
        if row is None:
            with self._db:
                self._db.execute("INSERT INTO meta VALUES ('identity', ?)", (want,))
        elif row[0] != want:
            raise ConfigError(f"{path} holds the answers of another model or setting ({row[0]}), not of {want}: "
                              "give another --output folder, or --fresh to start this one over")  # fmt: skip

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        keys = list(keys)
        found = {k: self._mem[k] for k in keys if k in self._mem}
        if self._db is not None:
            rest = [k for k in keys if k not in found]
            for i in range(0, len(rest), 500):
                chunk = rest[i : i + 500]
                q = f"SELECT key, value FROM answers WHERE key IN ({','.join('?' * len(chunk))})"
                for k, v in self._db.execute(q, chunk):
                    found[k] = json.loads(v)
        self.hits += len(found)
        return found

    def put_many(self, items: dict[str, Any]) -> None:
        self._mem.update(items)
        if self._db is not None and items:
            with self._db:  # one transaction
                self._db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?)", [(k, json.dumps(v, ensure_ascii=False)) for k, v in items.items()])

    def __len__(self) -> int:
        if self._db is None:
            return len(self._mem)
        return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
