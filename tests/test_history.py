"""The SQLite chat store: persistence across processes, schema upgrades, recovery, export."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest

from subspec_tui import history
from subspec_tui.history import ChatStore, HistoryError


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBSPEC_DATA_DIR", str(tmp_path))
    opened = ChatStore()
    yield opened
    opened.close()


def test_store_lives_in_the_data_dir_with_wal_and_current_schema(store, tmp_path):
    assert store.path == tmp_path / history.DB_NAME
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.schema_version == len(history.MIGRATIONS)


def test_chat_round_trip_and_engine_messages(store):
    chat = store.create_chat("Greetings", model="acme/m", method="subspec_sd",
                             system_prompt="Be brief.", sampling={"temperature": 0.7})
    store.add_message(chat.id, "user", "Hi")
    reply = store.add_message(chat.id, "assistant", "Hel")
    store.update_message(reply, "Hello!", finish_reason="eos", stats={"tau": 3.5})

    loaded = store.get_chat(chat.id)
    assert loaded.sampling == {"temperature": 0.7}
    assert [(m.role, m.content) for m in loaded.messages] == [("user", "Hi"), ("assistant", "Hello!")]
    assert loaded.messages[1].stats == {"tau": 3.5} and loaded.messages[1].finish_reason == "eos"
    assert loaded.engine_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    store.update_chat(chat.id, system_prompt="", title="Renamed")
    renamed = store.get_chat(chat.id)
    assert renamed.title == "Renamed" and renamed.engine_messages()[0]["role"] == "user"
    assert store.recent_prompts() == ["Hi"]


def test_list_orders_by_last_update_and_delete_cascades(store):
    first = store.create_chat("first", None, None)
    second = store.create_chat("second", None, None)
    store.add_message(first.id, "user", "bump")
    assert [c.title for c in store.list_chats()] == ["first", "second"]
    store.delete_chat(first.id)
    assert [c.id for c in store.list_chats()] == [second.id]
    assert store.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
    with pytest.raises(HistoryError, match="does not exist"):
        store.get_chat(first.id)


def test_partial_reply_survives_a_killed_process(tmp_path):
    """A writer killed mid-stream (os._exit, no cleanup) leaves its last update readable."""
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from subspec_tui.history import ChatStore
        store = ChatStore(Path({str(tmp_path / 'h.sqlite3')!r}))
        chat = store.create_chat("killed", None, None)
        store.add_message(chat.id, "user", "Tell me a story")
        reply = store.add_message(chat.id, "assistant", "")
        store.update_message(reply, "Once upon")
        store.update_message(reply, "Once upon a time")
        os._exit(9)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 9, run.stderr
    store = ChatStore(tmp_path / "h.sqlite3")
    (chat,) = store.list_chats()
    assert [m.content for m in store.get_chat(chat.id).messages] == ["Tell me a story", "Once upon a time"]


def test_upgrade_applies_only_missing_migrations(tmp_path, monkeypatch):
    path = tmp_path / "h.sqlite3"
    old = ChatStore(path)
    old.create_chat("kept", None, None)
    old.close()
    monkeypatch.setattr(history, "MIGRATIONS", [*history.MIGRATIONS, "ALTER TABLE chats ADD COLUMN pinned INTEGER"])
    upgraded = ChatStore(path)
    assert upgraded.schema_version == len(history.MIGRATIONS)
    assert [c.title for c in upgraded.list_chats()] == ["kept"]
    assert "pinned" in [row[1] for row in upgraded.db.execute("PRAGMA table_info(chats)")]


def test_newer_schema_is_left_untouched(tmp_path):
    path = tmp_path / "h.sqlite3"
    ChatStore(path).db.execute("UPDATE schema_version SET version = 99")
    store, warning = ChatStore.open_or_recover(path)
    assert "newer than this app knows" in warning and str(store.path) == ":memory:"
    assert sqlite3.connect(path).execute("SELECT version FROM schema_version").fetchone()[0] == 99


def test_damaged_file_is_moved_aside_and_a_new_history_started(tmp_path):
    path = tmp_path / "h.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    store, warning = ChatStore.open_or_recover(path)
    assert "moved it to" in warning
    assert store.list_chats() == []
    (backup,) = tmp_path.glob("h.sqlite3.corrupt-*")
    assert backup.read_bytes().startswith(b"this is not a database")


def test_export_markdown(store, tmp_path):
    chat = store.create_chat("Capital of France?", model="acme/m", method="vanilla", system_prompt="Be exact.")
    store.add_message(chat.id, "user", "What is the capital of France?")
    reply = store.add_message(chat.id, "assistant", "Paris")
    store.update_message(reply, "Paris", finish_reason="length")
    path = store.export_markdown(chat.id)
    assert path.parent == tmp_path / "exports" and path.name == f"chat-{chat.id}-capital-of-france.md"
    text = path.read_text()
    assert text.startswith("# Capital of France?\n")
    assert "## System\n\nBe exact." in text
    assert "## User\n\nWhat is the capital of France?" in text
    assert "## Assistant\n\nParis\n\n*(reply ended: length)*" in text


def test_a_data_folder_that_cannot_be_created_keeps_chats_in_memory(tmp_path):
    blocker = tmp_path / "data"
    blocker.write_text("a file where the folder should be")  # mkdir fails, even for root
    store, warning = ChatStore.open_or_recover(blocker / "history.sqlite3")
    assert warning.endswith("chats are not saved this session") and "\n" not in warning
    assert str(store.path) == ":memory:"
    store.create_chat("works", model=None, method=None)
    assert [c.title for c in store.list_chats()] == ["works"]
    assert blocker.read_text() == "a file where the folder should be"  # nothing moved aside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_history_file_that_cannot_be_opened_for_writing_is_copied_into_memory_not_moved(tmp_path):
    path = tmp_path / "h.sqlite3"
    first = ChatStore(path)
    chat = first.create_chat("kept", model=None, method=None)
    first.add_message(chat.id, "user", "hello")
    first.close()
    (tmp_path / "h.sqlite3-wal").mkdir()  # SQLite cannot create its write-ahead log: an I/O error, not damage
    store, warning = ChatStore.open_or_recover(path)
    assert "cannot write chat history" in warning and warning.endswith("chats are not saved this session")
    assert [m.content for m in store.get_chat(chat.id).messages] == ["hello"]  # readable this session
    assert not list(tmp_path.glob("*.corrupt-*"))  # never moved aside for an I/O error


def test_a_write_that_fails_mid_session_goes_on_in_memory_with_one_warning(tmp_path):
    path = tmp_path / "h.sqlite3"
    store = ChatStore(path)
    warnings: list[str] = []
    store.on_unsaved = warnings.append
    chat = store.create_chat("before", model=None, method=None)
    store.db.execute("PRAGMA query_only = ON")  # the file stops accepting writes (as an immutable file does)
    store.set_preference("method", "vanilla")
    store.add_message(chat.id, "user", "after")
    assert len(warnings) == 1 and "attempt to write a readonly database" in warnings[0]
    assert warnings[0].endswith("chats are not saved this session") and store.unsaved_reason == warnings[0]
    assert store.get_preference("method") == "vanilla"
    assert [m.content for m in store.get_chat(chat.id).messages] == ["after"]
    on_disk = sqlite3.connect(path)
    assert on_disk.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0  # the file is as it was
    assert on_disk.execute("SELECT title FROM chats").fetchall() == [("before",)]
