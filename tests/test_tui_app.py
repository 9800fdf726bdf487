"""Pilot tests of subspec-chat: every screen and flow, with a fake engine (tests/tui_fake_engine.py)."""

from __future__ import annotations

import dataclasses
import threading

import pytest
from textual.widgets import DataTable, Input, Markdown, Sparkline, Static

from engine import EngineError
from subspec_tui import app as app_module
from subspec_tui import models
from subspec_tui.app import SubSpecChatApp, build_parser
from subspec_tui.history import ChatStore
from subspec_tui.screens.chat import ChatScreen
from subspec_tui.screens.dialogs import ChatListScreen, ChatSettingsScreen, ConfirmScreen, HelpScreen
from subspec_tui.widgets.chat_log import AssistantTurn, PromptInput, UserTurn
from tui_fake_engine import FakeEngine, fake_loader

GIB = 1024**3

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("SUBSPEC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("SUBSPEC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "shared-gguf-cache"))


def make_app(engine: FakeEngine | None = None, **kwargs) -> SubSpecChatApp:
    loader = kwargs.pop("loader", None) or fake_loader(engine)
    kwargs.setdefault("gpu", None)
    return SubSpecChatApp(engine_loader=loader, **kwargs)


async def ready(app: SubSpecChatApp, pilot) -> ChatScreen:
    await app.workers.wait_for_complete()
    await pilot.pause()
    return app.chat_screen()


async def send(pilot, text: str) -> None:
    app = pilot.app
    prompt = app.chat_screen().query_one(PromptInput)
    prompt.focus()
    prompt.value = text
    await pilot.press("enter")
    await app.workers.wait_for_complete()
    await pilot.pause()


def transcript(screen: ChatScreen) -> list[tuple[str, str]]:
    turns = []
    for widget in screen.query(".turn"):
        if isinstance(widget, UserTurn):
            turns.append(("user", str(widget.render())))
        elif isinstance(widget, AssistantTurn):
            turns.append(("assistant", widget.text))
    return turns


def static_text(screen, selector: str) -> str:
    return str(screen.query_one(selector, Static).render())


async def test_chat_streams_a_reply_stores_it_and_fills_the_stats_panel():
    engine = FakeEngine()
    app = make_app(engine)
    async with app.run_test(size=(120, 36)) as pilot:
        chat = await ready(app, pilot)
        await send(pilot, "hi there")
        assert transcript(chat) == [("user", "hi there"), ("assistant", "Hello **world**, how are you?")]
        markdown = chat.query_one(AssistantTurn).query_one(Markdown)
        assert "world" in markdown.source
        figures = static_text(chat, "#stats-figures")
        assert "tau last/mean  3 / 2.00" in figures  # 3 pieces emitting 1, 2, 3 tokens
        assert "transfer       n/a (CPU, no offload)" in figures
        assert "CPU, no offload" in static_text(chat, "#stats-device")
        assert "  1 " in static_text(chat, "#stats-histogram")
        assert chat.query_one(Sparkline).data  # rates between iterations
        stored = app.store.get_chat(chat.chat.id)
        assert [(m.role, m.content) for m in stored.messages] == transcript(chat)
        assert stored.messages[1].finish_reason == "eos" and stored.messages[1].stats["tau"] == 2.0


async def test_multi_turn_context_and_per_chat_settings_reach_the_engine():
    engine = FakeEngine(reply="Paris.")
    app = make_app(engine)
    async with app.run_test(size=(120, 36)) as pilot:
        chat = await ready(app, pilot)
        await pilot.press("f5")
        await pilot.pause()
        settings = app.screen
        assert isinstance(settings, ChatSettingsScreen)
        settings.query_one("#system-prompt").text = "Answer in one word."
        settings.query_one("#max-new-tokens", Input).value = "17"
        settings_screen = app.screen
        settings_screen.query_one("#save").press()
        await pilot.pause()
        await send(pilot, "Capital of France?")
        await send(pilot, "And of Italy?")
        assert engine.seen_messages[-1] == [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
        ]
        assert engine.seen_sampling[-1].max_new_tokens == 17
        assert app.store.get_chat(chat.chat.id).sampling["max_new_tokens"] == 17


async def test_settings_dialog_rejects_bad_numbers_with_one_line():
    app = make_app()
    async with app.run_test(size=(120, 36)) as pilot:
        await ready(app, pilot)
        await pilot.press("f5")
        await pilot.pause()
        app.screen.query_one("#top-p", Input).value = "1.5"
        settings_screen = app.screen
        settings_screen.query_one("#save").press()
        await pilot.pause()
        assert isinstance(app.screen, ChatSettingsScreen)  # still open
        assert any("top p must be between 0.0 and 1.0" in n.message for n in app._notifications)


async def test_stop_cancels_a_streaming_reply_and_keeps_the_partial_text():
    gate = threading.Event()
    engine = FakeEngine(reply="one two three four five six", piece_words=1, gate=gate)
    app = make_app(engine)
    async with app.run_test(size=(120, 36)) as pilot:
        chat = await ready(app, pilot)
        prompt = chat.query_one(PromptInput)
        prompt.focus()
        prompt.value = "count"
        await pilot.press("enter")
        gate.set()  # let exactly one piece through
        for _ in range(50):
            await pilot.pause(0.02)
            if chat.query_one(AssistantTurn).text:
                break
        assert chat.generating and chat.query_one(AssistantTurn).text == "one"
        await pilot.press("escape")
        gate.set()
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert not chat.generating
        reply = app.store.get_chat(chat.chat.id).messages[1]
        assert (reply.content, reply.finish_reason) == ("one", "cancelled")
        assert "stopped" in static_text(chat.query_one(AssistantTurn), ".turn-notice")


async def test_context_limit_is_a_clear_notice():
    app = make_app(FakeEngine(finish_reason="context", max_length=512))
    async with app.run_test(size=(120, 36)) as pilot:
        chat = await ready(app, pilot)
        await send(pilot, "long story")
        notice = static_text(chat.query_one(AssistantTurn), ".turn-notice")
        assert "context limit (512 tokens)" in notice
        assert any("context limit" in n.message for n in app._notifications)


async def test_engine_error_during_generation_is_a_notification_and_the_prompt_is_kept():
    app = make_app(FakeEngine(generate_error="the prompt has 9000 tokens but the context holds 2048"))
    async with app.run_test(size=(120, 36)) as pilot:
        chat = await ready(app, pilot)
        await send(pilot, "a very long prompt")
        assert app.is_running
        assert any("9000 tokens" in n.message and n.severity == "error" for n in app._notifications)
        assert transcript(chat) == [("user", "a very long prompt")]
        assert [m.role for m in app.store.get_chat(chat.chat.id).messages] == ["user"]


async def test_unexpected_engine_exception_does_not_kill_the_app():
    class BrokenEngine(FakeEngine):
        def generate(self, *args, **kwargs):
            raise RuntimeError("boom")

    app = make_app(BrokenEngine())
    async with app.run_test(size=(120, 36)) as pilot:
        chat = await ready(app, pilot)
        await send(pilot, "hello")
        await pilot.pause()
        assert app.is_running and not chat.generating
        assert any("internal error" in n.message and "boom" in n.message for n in app._notifications)


async def test_model_load_failure_is_a_notification_and_sending_is_refused():
    app = make_app(loader=fake_loader(error="model folder /nope does not exist"))
    async with app.run_test(size=(120, 36)) as pilot:
        chat = await ready(app, pilot)
        assert "no model loaded: model folder /nope does not exist" in static_text(chat, "#chat-status")
        await send(pilot, "hello?")
        assert transcript(chat) == []
        assert any("no model is loaded" in n.message for n in app._notifications)


async def test_input_history_recalls_previous_prompts():
    app = make_app(FakeEngine(reply="ok"))
    async with app.run_test(size=(120, 36)) as pilot:
        chat = await ready(app, pilot)
        await send(pilot, "first")
        await send(pilot, "second")
        prompt = chat.query_one(PromptInput)
        prompt.focus()
        prompt.value = "draft"
        await pilot.press("up")
        assert prompt.value == "second"
        await pilot.press("up")
        assert prompt.value == "first"
        await pilot.press("down", "down")
        assert prompt.value == "draft"


async def test_new_chat_open_chat_and_export(tmp_path):
    app = make_app(FakeEngine(reply="Paris."))
    async with app.run_test(size=(120, 36)) as pilot:
        chat = await ready(app, pilot)
        await send(pilot, "Capital of France?")
        first_id = chat.chat.id
        await pilot.press("ctrl+s")
        await pilot.pause()
        exported = tmp_path / "data" / "exports" / f"chat-{first_id}-capital-of-france.md"
        assert "## Assistant\n\nParis." in exported.read_text()

        await pilot.press("ctrl+n")
        await pilot.pause()
        assert transcript(chat) == [] and chat.chat is None
        await send(pilot, "Second chat")
        assert len(app.store.list_chats()) == 2

        await pilot.press("ctrl+o")
        await pilot.pause()
        assert isinstance(app.screen, ChatListScreen)
        table = app.screen.query_one(DataTable)
        table.move_cursor(row=1)  # most recent first: row 1 is the first chat
        await pilot.press("enter")
        await pilot.pause()
        assert chat.chat.id == first_id
        assert transcript(chat) == [("user", "Capital of France?"), ("assistant", "Paris.")]


async def test_history_survives_a_restart():
    app = make_app(FakeEngine(reply="Remembered."))
    async with app.run_test(size=(120, 36)) as pilot:
        await ready(app, pilot)
        await send(pilot, "remember me")
    reopened = ChatStore()
    (chat,) = reopened.list_chats()
    assert [m.content for m in reopened.get_chat(chat.id).messages] == ["remember me", "Remembered."]


async def test_help_screen_and_command_palette():
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(app, pilot)
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        help_text = app.screen.query_one(Markdown).source
        for binding_id in ("chat.stop", "chat.new", "chat.export", "app.models", "app.help"):
            assert binding_id in help_text
        await pilot.press("escape")
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Export chat")
        await pilot.pause(0.3)
        options = [str(option.prompt) for option in app.screen.query_one("CommandList").options]
        assert any("Export chat to Markdown" in option for option in options)


def fixed_models() -> list[models.LocalModel]:
    bundled_config = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576,
                      "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
                      "vocab_size": 49152, "max_position_embeddings": 8192}
    qwen_config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 28,
                   "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
                   "tie_word_embeddings": False}
    from pathlib import Path

    return [
        models.LocalModel(models.BUNDLED_ID, Path("/bundled.gguf"), 98_362_432, "llama", "llama (GGUF)",
                          134_515_008, bundled=True, config=bundled_config),
        models.LocalModel("Qwen/Qwen2.5-7B-Instruct", Path("/hub/qwen"), 15_231_233_024, "qwen2",
                          "Qwen2ForCausalLM", 7_615_616_512, revision="abc", config=qwen_config),
    ]


async def test_models_screen_shows_fit_and_uses_a_model(monkeypatch):
    monkeypatch.setattr(models, "list_models", fixed_models)
    loader = fake_loader()
    app = make_app(loader=loader, gpu=("Fake GPU", 8 * GIB))
    async with app.run_test(size=(140, 36)) as pilot:
        await ready(app, pilot)
        await pilot.press("f3")
        await app.workers.wait_for_complete()
        await pilot.pause()
        table = app.screen.query_one("#models-table", DataTable)
        rows = [table.get_row_at(i) for i in range(table.row_count)]
        assert rows[0][0].startswith("▶ bundled:SmolLM2") and rows[0][4] == "yes, all 30 layers on GPU"
        assert rows[1][:4] == ["Qwen/Qwen2.5-7B-Instruct", "qwen2", "7.6B", "15.2 GB"]
        assert "layers on GPU, rest streamed" in rows[1][4] and rows[1][4].startswith("yes, ")
        table.focus()
        table.move_cursor(row=1)
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, ChatScreen)
        assert loader.configs[-1].llm_path == "Qwen/Qwen2.5-7B-Instruct"
        assert app.store.get_preference("model") == "Qwen/Qwen2.5-7B-Instruct"


async def test_models_screen_without_gpu_says_cpu_only(monkeypatch):
    monkeypatch.setattr(models, "list_models", fixed_models)
    app = make_app()
    async with app.run_test(size=(140, 36)) as pilot:
        await ready(app, pilot)
        await pilot.press("f3")
        await app.workers.wait_for_complete()
        await pilot.pause()
        table = app.screen.query_one("#models-table", DataTable)
        assert table.get_row_at(1)[4] == "CPU only (no GPU)"


@pytest.fixture
def fake_hub(monkeypatch):
    from models_fake_hub import FakeHub, FakeRepo
    from test_models import REPO, repo_files

    hub = FakeHub({REPO: FakeRepo(repo_files())}).start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    yield hub, REPO
    hub.stop()


async def test_models_screen_dry_run_download_and_delete(fake_hub):
    hub, repo = fake_hub
    app = make_app()
    async with app.run_test(size=(140, 36)) as pilot:
        await ready(app, pilot)
        await pilot.press("f3")
        await app.workers.wait_for_complete()
        await pilot.pause()
        screen = app.screen
        screen.query_one("#repo-id", Input).value = repo
        await pilot.click("#dry-run")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert f"{repo}: 3 files" in static_text(screen, "#pull-status")

        await pilot.click("#pull")
        await app.workers.wait_for_complete()
        await pilot.pause()
        await app.workers.wait_for_complete()  # the refresh started by the finished pull
        await pilot.pause()
        table = screen.query_one("#models-table", DataTable)
        keys = [table.coordinate_to_cell_key((i, 0)).row_key.value for i in range(table.row_count)]
        assert keys == [models.BUNDLED_ID, repo]
        assert screen.query_one("#pull-progress").percentage == 1.0

        table.focus()
        table.move_cursor(row=1)
        await pilot.press("delete")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.click("#yes")
        await app.workers.wait_for_complete()
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert any(n.message.startswith(f"deleted {repo}, freed") for n in app._notifications)
        assert table.row_count == 1


async def test_models_screen_download_error_is_a_notification(fake_hub):
    app = make_app()
    async with app.run_test(size=(140, 36)) as pilot:
        await ready(app, pilot)
        await pilot.press("f3")
        await app.workers.wait_for_complete()
        await pilot.pause()
        app.screen.query_one("#repo-id", Input).value = "acme/does-not-exist"
        await pilot.click("#pull")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert any("'acme/does-not-exist' not found on the hub" in n.message for n in app._notifications)
        assert not app.screen.query_one("#pull").disabled


async def test_profile_screen_shows_the_plan_on_a_gpu(monkeypatch):
    monkeypatch.setattr(models, "list_models", fixed_models)
    app = make_app(gpu=("Fake GPU", 8 * GIB))
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(app, pilot)
        await pilot.press("f4")
        await pilot.pause()
        assert "Fake GPU (8.6 GB)" in static_text(app.screen, "#profile-hardware")
        plan = static_text(app.screen, "#profile-plan")
        assert "layers on GPU  30 of 30" in plan and "verdict        fits" in plan
        assert "fake-model" in static_text(app.screen, "#profile-engine")


async def test_profile_screen_on_cpu_is_honest():
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(app, pilot)
        await pilot.press("f4")
        await pilot.pause()
        assert "none: everything runs on the CPU" in static_text(app.screen, "#profile-hardware")
        assert "offload        none (CPU, no offload)" in static_text(app.screen, "#profile-engine")


def test_command_line_options(monkeypatch):
    args = build_parser().parse_args(["--model", "Qwen/Qwen2.5-7B-Instruct", "--method", "vanilla"])
    assert (args.model, args.method) == ("Qwen/Qwen2.5-7B-Instruct", "vanilla")
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--method", "warp"])
    assert exit_info.value.code == 2

    started = []
    monkeypatch.setattr(SubSpecChatApp, "run", lambda self: started.append((self.model_ref, self.method)))
    monkeypatch.setattr(app_module, "detect_gpu", lambda: None)
    app_module.main(["--model", "/models/tiny", "--method", "vanilla"])
    assert started == [("/models/tiny", "vanilla")]


def test_engine_error_type_is_the_contract():
    assert issubclass(EngineError, Exception)  # front ends catch exactly this type


@pytest.mark.slow
async def test_chat_with_the_real_bundled_model():
    """The whole chat flow on the real engine and the bundled SmolLM2-135M-Instruct (CPU)."""
    app = SubSpecChatApp(method="vanilla", gpu=None)
    async with app.run_test(size=(120, 36)) as pilot:
        chat = await ready(app, pilot)
        assert app.engine is not None, app.engine_error
        app.pending_sampling = dataclasses.replace(app.pending_sampling, max_new_tokens=24)
        await send(pilot, "What is the capital of France?")
        (user, reply) = transcript(chat)
        assert user == ("user", "What is the capital of France?")
        assert "Paris" in reply[1]
        stored = app.store.get_chat(chat.chat.id).messages[1]
        assert stored.content == reply[1] and stored.stats["new_tokens"] > 0
        assert "CPU, no offload" in static_text(chat, "#stats-device")
        assert "tau last/mean  1 / 1.00" in static_text(chat, "#stats-figures")  # vanilla: one token per pass
