"""Chat history in SQLite (WAL) under the platformdirs data dir, with a versioned schema.

Every write commits at once: the user's message is stored before generation starts and the
assistant's reply is rewritten as it streams, so killing the app loses at most the last
fraction of a second of a reply.

A folder or file that cannot be written (read-only, immutable, disk failing) is never a crash and
never moved aside: the chats so far are copied into memory and the session goes on unsaved, with
one line saying so. Only a file SQLite reports as damaged is moved aside and started afresh.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import platformdirs

APP_NAME = "subspec-chat"
DB_NAME = "history.sqlite3"

# Schema upgrades, applied in order; a database records how many it has had in `schema_version`.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE chats (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        model TEXT,
        method TEXT,
        system_prompt TEXT NOT NULL DEFAULT '',
        sampling TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        created REAL NOT NULL,
        finish_reason TEXT,
        stats TEXT
    );
    CREATE INDEX messages_by_chat ON messages(chat_id, id);
    CREATE TABLE preferences (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
]


class HistoryError(Exception):
    """The history database cannot be used (newer schema, unreadable file): one line for the user."""


class NewerSchemaError(HistoryError):
    """Written by a newer version of the app: left untouched."""


class UnwritableError(HistoryError):
    """The folder or file cannot be written (permissions, read-only or failing disk): left untouched."""


class CorruptError(HistoryError):
    """SQLite says the file is not a (sound) database: the one case that moves it aside."""


def _unsaved(reason: str) -> str:
    return f"{reason}; chats are not saved this session"


def data_dir() -> Path:
    """Where chats live; SUBSPEC_DATA_DIR overrides the platformdirs location (tests, portable use)."""
    return Path(os.environ.get("SUBSPEC_DATA_DIR") or platformdirs.user_data_dir(APP_NAME))


@dataclass
class Message:
    id: int
    role: str
    content: str
    finish_reason: str | None = None
    stats: dict | None = None


@dataclass
class Chat:
    id: int
    title: str
    created: float
    updated: float
    model: str | None
    method: str | None
    system_prompt: str = ""
    sampling: dict = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)

    def engine_messages(self) -> list[dict[str, str]]:
        """role/content dicts for the chat template: system prompt, then every turn with content."""
        turns = [{"role": "system", "content": self.system_prompt}] if self.system_prompt.strip() else []
        turns += [{"role": m.role, "content": m.content} for m in self.messages if m.content]
        return turns


class ChatStore:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or data_dir() / DB_NAME
        # Called once, with one line, if a write fails and the session goes on in memory.
        self.on_unsaved: Callable[[str], None] | None = None
        self.unsaved_reason: str | None = None
        try:
            if str(self.path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, isolation_level=None)  # autocommit: each write is durable
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._upgrade()
        except OSError as err:
            raise UnwritableError(f"cannot write chat history in {self.path.parent}: {err.strerror or err}") from None
        except sqlite3.OperationalError as err:  # read-only, locked, I/O error: not the file's fault
            raise UnwritableError(f"cannot write chat history {self.path}: {err}") from None
        except sqlite3.DatabaseError as err:
            raise CorruptError(f"chat history {self.path} is damaged ({err})") from None

    @classmethod
    def open_or_recover(cls, path: Path | None = None) -> tuple["ChatStore", str | None]:
        """Open the store. A damaged file is moved aside and a fresh one started; a newer or
        unwritable one is left alone and chats are kept in memory (the existing ones copied there
        when they can be read). Returns (store, warning: one line, or None)."""
        try:
            return cls(path), None
        except NewerSchemaError as err:
            return cls(Path(":memory:")), _unsaved(str(err))
        except UnwritableError as err:
            return cls._read_into_memory(Path(path or data_dir() / DB_NAME)), _unsaved(str(err))
        except CorruptError as err:
            damaged = Path(path or data_dir() / DB_NAME)
            backup = damaged.with_name(f"{damaged.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            try:
                damaged.rename(backup)
                return cls(path), f"{err}; moved it to {backup.name} and started a new history"
            except (OSError, HistoryError) as again:
                reason = again.strerror if isinstance(again, OSError) else str(again)
                return cls(Path(":memory:")), _unsaved(f"{err} and cannot be replaced ({reason})")

    @classmethod
    def _read_into_memory(cls, path: Path) -> "ChatStore":
        """An in-memory store holding a copy of the chats at `path` (empty when unreadable)."""
        store = cls(Path(":memory:"))
        try:
            source = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)  # no WAL or lock files needed
            try:
                source.backup(store.db)
            finally:
                source.close()
            store._upgrade()
        except (sqlite3.DatabaseError, HistoryError):
            store = cls(Path(":memory:"))
        return store

    def close(self) -> None:
        self.db.close()

    def _write(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        """Run one write; if the file stops accepting writes, go on in memory with what it held."""
        try:
            return self.db.execute(sql, params)
        except sqlite3.OperationalError as err:
            if str(self.path) == ":memory:":
                raise
            self._move_to_memory(str(err))
            return self.db.execute(sql, params)

    def _move_to_memory(self, reason: str) -> None:
        memory = sqlite3.connect(":memory:", isolation_level=None)
        self.db.backup(memory)  # reading still works: copy every chat so far
        self.db.close()
        memory.execute("PRAGMA foreign_keys=ON")
        self.db, self.unsaved_reason = memory, _unsaved(f"cannot write chat history {self.path}: {reason}")
        self.path = Path(":memory:")
        if self.on_unsaved is not None:
            self.on_unsaved(self.unsaved_reason)

    # ------------------------------------------------------------ schema

    @property
    def schema_version(self) -> int:
        row = self.db.execute("SELECT version FROM schema_version").fetchone()
        return row[0]

    def _upgrade(self) -> None:
        self.db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        if self.db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
            self.db.execute("INSERT INTO schema_version VALUES (0)")
        version = self.schema_version
        if version > len(MIGRATIONS):
            raise NewerSchemaError(
                f"chat history {self.path} has schema version {version}, newer than this app knows "
                f"({len(MIGRATIONS)}): upgrade subspec-chat"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            self.db.execute("BEGIN")
            try:
                for statement in _statements(script):
                    self.db.execute(statement)
                self.db.execute("UPDATE schema_version SET version = ?", (number,))
                self.db.execute("COMMIT")
            except sqlite3.DatabaseError:
                self.db.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------ chats

    def create_chat(self, title: str, model: str | None, method: str | None,
                    system_prompt: str = "", sampling: dict | None = None) -> Chat:
        now = time.time()
        cursor = self._write(
            "INSERT INTO chats (title, created, updated, model, method, system_prompt, sampling)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (title, now, now, model, method, system_prompt, json.dumps(sampling or {})),
        )
        return self.get_chat(cursor.lastrowid)

    def get_chat(self, chat_id: int) -> Chat:
        row = self.db.execute(
            "SELECT id, title, created, updated, model, method, system_prompt, sampling FROM chats WHERE id = ?",
            (chat_id,),
        ).fetchone()
        if row is None:
            raise HistoryError(f"chat {chat_id} does not exist")
        chat = Chat(*row[:7], sampling=json.loads(row[7]))
        chat.messages = [
            Message(id_, role, content, finish, json.loads(stats) if stats else None)
            for id_, role, content, finish, stats in self.db.execute(
                "SELECT id, role, content, finish_reason, stats FROM messages WHERE chat_id = ? ORDER BY id",
                (chat_id,),
            )
        ]
        return chat

    def list_chats(self) -> list[Chat]:
        """All chats, most recently updated first, without their messages."""
        rows = self.db.execute(
            "SELECT id, title, created, updated, model, method, system_prompt, sampling"
            " FROM chats ORDER BY updated DESC, id DESC"
        ).fetchall()
        return [Chat(*row[:7], sampling=json.loads(row[7])) for row in rows]

    def update_chat(self, chat_id: int, *, title: str | None = None, system_prompt: str | None = None,
                    sampling: dict | None = None, model: str | None = None, method: str | None = None) -> None:
        changes = {
            "title": title,
            "system_prompt": system_prompt,
            "sampling": json.dumps(sampling) if sampling is not None else None,
            "model": model,
            "method": method,
        }
        changes = {column: value for column, value in changes.items() if value is not None}
        assignments = ", ".join(f"{column} = ?" for column in changes)
        self._write(
            f"UPDATE chats SET {assignments}{', ' if assignments else ''}updated = ? WHERE id = ?",
            (*changes.values(), time.time(), chat_id),
        )

    def delete_chat(self, chat_id: int) -> None:
        self._write("DELETE FROM chats WHERE id = ?", (chat_id,))

    # ------------------------------------------------------------ messages

    def add_message(self, chat_id: int, role: str, content: str) -> int:
        now = time.time()
        cursor = self._write(
            "INSERT INTO messages (chat_id, role, content, created) VALUES (?, ?, ?, ?)",
            (chat_id, role, content, now),
        )
        self._write("UPDATE chats SET updated = ? WHERE id = ?", (now, chat_id))
        return cursor.lastrowid

    def update_message(self, message_id: int, content: str, finish_reason: str | None = None,
                       stats: dict | None = None) -> None:
        self._write(
            "UPDATE messages SET content = ?, finish_reason = COALESCE(?, finish_reason),"
            " stats = COALESCE(?, stats) WHERE id = ?",
            (content, finish_reason, json.dumps(stats) if stats is not None else None, message_id),
        )

    def recent_prompts(self, limit: int = 100) -> list[str]:
        """The user's latest prompts across chats, oldest first (input history)."""
        rows = self.db.execute(
            "SELECT content FROM messages WHERE role = 'user' ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [content for (content,) in reversed(rows)]

    # ------------------------------------------------------------ preferences

    def get_preference(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM preferences WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_preference(self, key: str, value: str) -> None:
        self._write(
            "INSERT INTO preferences (key, value) VALUES (?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # ------------------------------------------------------------ export

    def export_markdown(self, chat_id: int, folder: Path | None = None) -> Path:
        """Write the chat as Markdown under `folder` (default: <data dir>/exports); returns the file."""
        chat = self.get_chat(chat_id)
        folder = folder or data_dir() / "exports"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"chat-{chat.id}-{_slug(chat.title)}.md"
        path.write_text(chat_markdown(chat), encoding="utf-8")
        return path


def chat_markdown(chat: Chat) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(chat.created))
    lines = [f"# {chat.title}", "", f"*{chat.model or 'bundled model'} · {chat.method or '?'} · {when}*", ""]
    if chat.system_prompt.strip():
        lines += ["## System", "", chat.system_prompt.strip(), ""]
    for message in chat.messages:
        lines += [f"## {message.role.capitalize()}", "", message.content.strip(), ""]
        if message.finish_reason not in (None, "eos", "stop"):
            lines += [f"*(reply ended: {message.finish_reason})*", ""]
    return "\n".join(lines)


def _slug(title: str) -> str:
    words = "".join(c if c.isalnum() else " " for c in title.lower()).split()
    return "-".join(words[:8]) or "untitled"


def _statements(script: str) -> list[str]:
    """Split a migration into statements (executescript would commit outside our transaction)."""
    return [part.strip() for part in script.split(";") if part.strip()]
