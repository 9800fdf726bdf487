"""Chat history in SQLite (WAL) under the platformdirs data dir, with a versioned schema.

Every write commits at once: the user's message is stored before generation starts and the
assistant's reply is rewritten as it streams, so killing the app loses at most the last
fraction of a second of a reply.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

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
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None)  # autocommit: each write is durable
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._upgrade()
        except sqlite3.DatabaseError as err:
            raise HistoryError(f"cannot open chat history {self.path}: {err}") from None

    @classmethod
    def open_or_recover(cls, path: Path | None = None) -> tuple["ChatStore", str | None]:
        """Open the store; a damaged file is moved aside and a fresh one started, a newer one is
        left alone and chats are kept in memory for this session. Returns (store, warning)."""
        try:
            return cls(path), None
        except NewerSchemaError as err:
            return cls(Path(":memory:")), f"{err}; chats are not saved this session"
        except HistoryError as err:
            damaged = Path(path or data_dir() / DB_NAME)
            backup = damaged.with_name(f"{damaged.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            damaged.rename(backup)
            return cls(path), f"{err}; moved it to {backup.name} and started a new history"

    def close(self) -> None:
        self.db.close()

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
        cursor = self.db.execute(
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
        self.db.execute(
            f"UPDATE chats SET {assignments}{', ' if assignments else ''}updated = ? WHERE id = ?",
            (*changes.values(), time.time(), chat_id),
        )

    def delete_chat(self, chat_id: int) -> None:
        self.db.execute("DELETE FROM chats WHERE id = ?", (chat_id,))

    # ------------------------------------------------------------ messages

    def add_message(self, chat_id: int, role: str, content: str) -> int:
        now = time.time()
        cursor = self.db.execute(
            "INSERT INTO messages (chat_id, role, content, created) VALUES (?, ?, ?, ?)",
            (chat_id, role, content, now),
        )
        self.db.execute("UPDATE chats SET updated = ? WHERE id = ?", (now, chat_id))
        return cursor.lastrowid

    def update_message(self, message_id: int, content: str, finish_reason: str | None = None,
                       stats: dict | None = None) -> None:
        self.db.execute(
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
        self.db.execute(
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
