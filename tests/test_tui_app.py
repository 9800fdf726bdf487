"""Pilot tests of subspec-chat: every screen and flow, with a fake engine (tests/tui_fake_engine.py)."""

from __future__ import annotations

import dataclasses
import functools
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from textual.widgets import DataTable, Input, Markdown, Sparkline, Static

from engine import EngineConfig, EngineError, SamplingConfig
from profiles import Profile, ProfileError, run_profile
from subspec_tui import app as app_module
from subspec_tui import start
from subspec_tui import models
from subspec_tui.app import SubSpecChatApp, plan_settings
from subspec_tui.start import build_parser
from subspec_tui.history import ChatStore
from subspec_tui.screens.chat import ChatScreen
from subspec_tui.screens.dialogs import ChatListScreen, ChatSettingsScreen, ConfirmScreen, HelpScreen
from subspec_tui.widgets.chat_log import AssistantTurn, PromptInput, UserTurn
from subspec_tui.settings import method_preset
from tui_fake_engine import FAKE_CPU, FAKE_GPU, FakeEngine, FakeProfiler, cpu_plan, fake_loader, gpu_plan

GIB = 1024**3

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    # Converted models and GGUF summaries go to conftest's session cache (isolated_cache).
    monkeypatch.setenv("SUBSPEC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SUBSPEC_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))


def make_app(engine: FakeEngine | None = None, **kwargs) -> SubSpecChatApp:
    loader = kwargs.pop("loader", None) or fake_loader(engine)
    kwargs.setdefault("gpu", None)
    kwargs.setdefault("profiler", FakeProfiler())
    return SubSpecChatApp(engine_loader=loader, **kwargs)


async def ready(app: SubSpecChatApp, pilot, timeout_s: float = 300.0) -> ChatScreen:
    """Wait for the start-up chain (profile, then engine) to end, loaded or failed. Not
    workers.wait_for_complete: it raises the error of a failed load, and the engine worker only
    starts once the profile worker has ended."""
    deadline = time.monotonic() + timeout_s
    while app.engine_loading and time.monotonic() < deadline:
        await pilot.pause(0.01)
    assert not app.engine_loading, f"still loading after {timeout_s:.0f} s: {app.load_progress}"
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


async def wait_until(pilot, condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await pilot.pause(0.01)
    assert condition(), "the app never reached the awaited state"


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


async def test_a_long_error_wraps_in_the_status_line_instead_of_being_cut():
    reason = "model folder /a/very/long/path/to/some/model/that/is/not/there does not exist: " + "detail " * 20
    app = make_app(loader=fake_loader(error=reason.strip()))
    async with app.run_test(size=(100, 36)) as pilot:
        chat = await ready(app, pilot)
        status = chat.query_one("#chat-status", Static)
        assert reason.strip() in str(status.render()) and status.size.height > 1


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


async def test_models_screen_download_error_stays_on_the_models_screen(fake_hub):
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
        assert any("'acme/does-not-exist' not found on the hub" in text for text in app.screen.alerts.texts)
        assert not app.screen.query_one("#pull").disabled


async def test_profile_screen_shows_the_plan_on_a_gpu(monkeypatch):
    monkeypatch.setattr(models, "list_models", fixed_models)
    app = make_app(gpu=("Fake GPU", 8 * GIB))
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(app, pilot)
        await pilot.press("f4")
        await app.workers.wait_for_complete()  # the model listing behind the estimate
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
    monkeypatch.setattr(SubSpecChatApp, "run", lambda self: started.append((self.model_ref, self.method, self.max_length)))
    monkeypatch.setattr(app_module, "detect_gpu", lambda: None)
    start.main(["--model", "/models/tiny", "--method", "vanilla"])
    start.main(["--max-length", "4096"])
    assert started[0] == ("/models/tiny", "vanilla", None) and started[1][2] == 4096
    with pytest.raises(SystemExit):
        start.main(["--max-length", "1"])


def test_engine_error_type_is_the_contract():
    assert issubclass(EngineError, Exception)  # front ends catch exactly this type




# ---------------------------------------------------------------- profile, then engine


async def test_first_start_shows_the_measurement_then_lands_in_the_chat_with_the_plan():
    gate = threading.Event()
    steps = ("profiling bundled:SmolLM2-135M-Instruct (subspec_sd) on CPU Fake CPU (2 cores)",
             "measuring vanilla", "measuring subspec_sd depth 12 top-4")
    profiler = FakeProfiler(cpu_plan("subspec_sd", max_depth=12, topk_len=4, max_context=1024), steps=steps, gate=gate)
    loader = fake_loader()
    app = make_app(loader=loader, profiler=profiler)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.current_mode == "profile")
        # the worker's progress reaches the screen through the event loop: wait for the first step
        await wait_until(pilot, lambda: steps[0] in static_text(app.screen, "#profile-measured"))
        measured = static_text(app.screen, "#profile-measured")
        assert measured.splitlines() == [
            "measuring bundled:SmolLM2-135M-Instruct (method from the profile) on this machine; "
            "the profile is stored and reused by later starts",
            steps[0],
        ]
        assert app.screen.query_one("#profile-progress").display
        assert f"measuring this machine: {steps[0]}" in static_text(app.chat_screen(), "#chat-status")
        assert loader.configs == []  # the engine waits for the plan
        await pilot.press("ctrl+r")  # a second measurement is refused while one runs
        assert any("still loading" in n.message for n in app._notifications)

        gate.set()
        chat = await ready(app, pilot)
        assert app.current_mode == "chat"
        assert profiler.calls == [(None, None, False)]  # no method asked for: the profile chooses
        (config,) = loader.configs
        assert (config.method, config.max_depth, config.topk_len, config.max_length) == ("subspec_sd", 12, 4, 1024)
        assert static_text(chat, "#chat-status") == "fake-model · subspec_sd · new chat"
        await pilot.press("f4")
        await pilot.pause()
        measured = static_text(app.screen, "#profile-measured")
        assert "Tree:     reference, depth 12, top-4 (49 nodes)" in measured and "Profile:  measured" in measured
        assert not app.screen.query_one("#profile-progress").display


def loader_where_deeper_trees_decode_faster(loaded: list[EngineConfig]):
    """The engine loader handed to the real run_profile: the CPU comparison has a known winner."""

    def load(config: EngineConfig, progress) -> FakeEngine:
        loaded.append(config)
        return FakeEngine(config, decode_s=0.5 / (1 + config.max_depth) if config.method != "vanilla" else 0.5)

    return load


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: on a GPU run_profile measures the GPU")
async def test_the_stored_profile_is_reused_and_a_changed_model_is_measured_again(tmp_path):
    measured: list[EngineConfig] = []
    profiler = functools.partial(run_profile, loader=loader_where_deeper_trees_decode_faster(measured),
                                 cpu_new_tokens=4)
    fastest = (12, 4)  # fit.CPU_CANDIDATES' deepest tree

    async def start(model_ref: str | None = None) -> tuple[Profile, list[EngineConfig], bool]:
        """(the profile used, the engine configs loaded, whether the profile screen was shown)"""
        loader = fake_loader()
        app = make_app(loader=loader, profiler=profiler, model_ref=model_ref)
        async with app.run_test(size=(120, 36)) as pilot:
            await ready(app, pilot)
            assert app.current_mode == "chat" and app.engine is not None
            return app.profile, loader.configs, app.get_screen("profile").is_mounted

    first, configs, shown = await start()
    assert not first.reused and shown and len(measured) == 3  # vanilla and two trees, one load each
    assert first.path == tmp_path / "config" / "profiles" / "cpu.toml"
    assert (configs[-1].method, configs[-1].max_depth, configs[-1].topk_len) == ("subspec_sd", *fastest)

    second, configs, shown = await start()
    assert second.reused and len(measured) == 3  # read back: nothing measured
    assert not shown  # and the chat was never left
    assert (configs[-1].max_depth, configs[-1].topk_len) == fastest

    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    other, configs, _ = await start(str(folder))
    assert not other.reused and len(measured) == 6 and other.model == str(folder.resolve())
    assert configs[-1].llm_path == str(folder)
    assert (await start(str(folder)))[0].reused

    (folder / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 4}')  # new weights, same path
    changed, _, _ = await start(str(folder))
    assert not changed.reused and len(measured) == 9


async def test_switching_models_profiles_the_new_one_and_is_refused_while_a_reply_streams():
    gate = threading.Event()
    profiler = FakeProfiler()
    loader = fake_loader(FakeEngine(reply="one two three", piece_words=1, gate=gate))
    app = make_app(loader=loader, profiler=profiler)
    async with app.run_test(size=(120, 36)) as pilot:
        chat = await ready(app, pilot)
        prompt = chat.query_one(PromptInput)
        prompt.focus()
        prompt.value = "count"
        await pilot.press("enter")
        await wait_until(pilot, lambda: chat.generating)
        app.use_model("/models/other", "other")
        await pilot.pause()
        assert any("a reply is streaming: stop it first (esc)" == n.message for n in app._notifications)
        assert app.model_ref is None and len(profiler.calls) == 1
        await pilot.press("escape")
        gate.set()
        await wait_until(pilot, lambda: not chat.generating)

        app.use_model("/models/other", "other")
        await ready(app, pilot)
        assert profiler.calls[-1] == ("/models/other", None, False)
        assert loader.configs[-1].llm_path == "/models/other"


async def test_rerun_profiling_measures_again_and_reloads_the_engine():
    profiler = FakeProfiler(steps=("measuring vanilla",))
    loader = fake_loader()
    app = make_app(loader=loader, profiler=profiler)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(app, pilot)
        first_engine = app.engine
        await pilot.press("f4")
        await pilot.pause()
        await pilot.press("ctrl+r")
        await ready(app, pilot)
        assert profiler.calls == [(None, None, False), (None, None, True)]
        assert first_engine.closed and app.engine is not first_engine and len(loader.configs) == 2
        assert app.current_mode == "profile"  # asked for here: the user stays here
        assert "Profile:  measured" in static_text(app.screen, "#profile-measured")


@pytest.mark.parametrize("profiler, message", [
    (FakeProfiler(steps=("profiling",), error=ProfileError("the model does not fit this GPU with subspec_sd")),
     "the model does not fit this GPU with subspec_sd"),
    (FakeProfiler(error=RuntimeError("boom")), "internal error: RuntimeError('boom')"),
    (FakeProfiler(plan=cpu_plan("subspec_sd", max_depth=0)),
     "the measured profile: key 'max_depth' must be at least 1, got 0"),
])
async def test_a_failed_profile_is_an_alert_that_stays_and_lands_in_the_chat(profiler, message):
    loader = fake_loader()
    app = make_app(loader=loader, profiler=profiler)
    async with app.run_test(size=(120, 40)) as pilot:
        chat = await ready(app, pilot)
        assert app.is_running and app.current_mode == "chat" and loader.configs == []
        assert chat.alerts.texts == [f"no model loaded: {message}"]
        await pilot.pause(0.5)
        assert chat.alerts.texts == [f"no model loaded: {message}"]  # not a toast: it stays until dismissed
        assert static_text(chat, "#chat-status") == f"no model loaded: {message} (F3: models)"
        await send(pilot, "hello?")
        assert any("no model is loaded" in n.message for n in app._notifications)


async def test_profile_messages_are_warnings_that_stay_until_dismissed():
    note = "profile /x/cpu.toml was not valid TOML: moved to cpu.toml.bad-1, measuring again"
    app = make_app(profiler=FakeProfiler(messages=(note,)))
    async with app.run_test(size=(120, 36)) as pilot:
        chat = await ready(app, pilot)
        assert chat.alerts.texts == [note]
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert chat.alerts.texts == []


def test_the_app_plans_as_every_front_end_does():
    def profiler_of(plan, device=FAKE_CPU):
        return FakeProfiler(plan, device=device)

    quiet = lambda _text: None  # noqa: E731
    settings, planned = plan_settings(None, None, None, profiler_of(cpu_plan("subspec_sd", 12, 4, 1024)), quiet, False,
                                      gpu=False)
    engine = settings.engine
    assert (engine.method, engine.max_depth, engine.topk_len, engine.max_length) == ("subspec_sd", 12, 4, 1024)
    assert planned.source == "profile"

    # A CPU profile that measured vanilla fastest: used, unless the user chose a method.
    vanilla = profiler_of(cpu_plan("vanilla", max_context=1024))
    settings, _ = plan_settings(None, None, None, vanilla, quiet, False, gpu=False)
    assert settings.engine.method == "vanilla"
    settings, planned = plan_settings(None, "subspec_sd", None, vanilla, quiet, False, gpu=False)
    preset = method_preset("subspec_sd")
    engine = settings.engine
    assert (engine.method, engine.max_depth, engine.topk_len) == ("subspec_sd", preset["max_depth"], preset["topk_len"])
    assert engine.max_length == 1024 and any("using subspec_sd as asked" in note for note in planned.notes)

    settings, _ = plan_settings("/models/m", None, None, profiler_of(gpu_plan(layers_on_gpu=10), FAKE_GPU), quiet,
                                False, gpu=True)
    engine = settings.engine
    assert (engine.llm_path, engine.keep_first_n_layers_on_gpu, engine.offload_slots) == ("/models/m", 10, 3)
    assert (engine.substitute_bits, engine.substitute_group_size, engine.max_depth) == (4, 64, 16)

    # subspec-chat --max-length: the user's context is measured and used, not the profile's own.
    chosen = profiler_of(cpu_plan("subspec_sd", max_context=2048))
    settings, _ = plan_settings(None, None, None, chosen, quiet, False, gpu=False, max_length=2048)
    assert chosen.contexts == [2048] and settings.engine.max_length == 2048
    assert profiler_of(None).contexts == [] and vanilla.contexts == [None, None]


async def test_profile_screen_lists_models_off_the_ui_thread(monkeypatch):
    gate = threading.Event()
    listing_threads: list[threading.Thread] = []

    def slow_list() -> list[models.LocalModel]:
        listing_threads.append(threading.current_thread())
        gate.wait(timeout=10)
        return fixed_models()

    monkeypatch.setattr(models, "list_models", slow_list)
    app = make_app(gpu=("Fake GPU", 8 * GIB))
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(app, pilot)
        await pilot.press("f4")
        await pilot.pause()
        assert static_text(app.screen, "#profile-plan") == "scanning the model cache…"
        await pilot.press("f2")  # the UI answers while the scan runs
        assert app.current_mode == "chat"
        gate.set()
        await app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.press("f4")
        await pilot.pause()
        assert "layers on GPU  30 of 30" in static_text(app.screen, "#profile-plan")
        # in workers: the app's own listing at start (command palette) and the screen's
        assert listing_threads and not any(t is threading.main_thread() for t in listing_threads)


async def test_profile_screen_listing_error_is_a_notification(monkeypatch):
    def unreadable_cache() -> list[models.LocalModel]:
        raise EngineError("cannot read the hub cache at /hub: permission denied")

    monkeypatch.setattr(models, "list_models", unreadable_cache)
    app = make_app(gpu=("Fake GPU", 8 * GIB))
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(app, pilot)
        await pilot.press("f4")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.is_running and static_text(app.screen, "#profile-plan") == "cannot list the local models"
        assert any("permission denied" in n.message and n.severity == "error" for n in app._notifications)


@pytest.mark.slow
async def test_subspec_chat_with_the_real_bundled_model_equals_vanilla_greedy(bundled_engine, monkeypatch):
    """The app loads the bundled SmolLM2-135M-Instruct with subspec_sd (the CLI's default method)
    and a CPU plan as profiling writes it; the streamed reply is exactly vanilla greedy decoding."""
    prompt, max_new_tokens = "What is the capital of France?", 24
    streamed: list[str] = []
    append = AssistantTurn.append

    async def recording_append(self, fragment: str) -> None:
        streamed.append(fragment)
        await append(self, fragment)

    monkeypatch.setattr(AssistantTurn, "append", recording_append)
    app = SubSpecChatApp(method="subspec_sd", gpu=None, profiler=FakeProfiler(cpu_plan("subspec_sd", 6, 2)))
    async with app.run_test(size=(120, 36)) as pilot:
        chat = await ready(app, pilot)
        assert app.engine is not None, app.engine_error
        config = app.engine.config
        assert (config.method, config.max_depth, config.topk_len) == ("subspec_sd", 6, 2)
        app.pending_sampling = dataclasses.replace(app.pending_sampling, max_new_tokens=max_new_tokens)
        await send(pilot, prompt)
        reply = app.store.get_chat(chat.chat.id).messages[1]
        figures = static_text(chat, "#stats-figures")
        assert "CPU, no offload" in static_text(chat, "#stats-device")

    vanilla = bundled_engine("vanilla")
    expected = vanilla.generate(vanilla.chat_ids([{"role": "user", "content": prompt}]),
                                SamplingConfig(max_new_tokens=max_new_tokens))
    assert "Paris" in expected.text
    assert "".join(streamed) == expected.text and reply.content == expected.text
    assert reply.stats["new_tokens"] == len(expected.token_ids)
    shown = re.search(r"tau last/mean  (\d+) / (\d+\.\d\d)", figures)
    assert shown is not None, figures
    assert shown[2] == f"{reply.stats['tau']:.2f}" and reply.stats["tau"] > 1.0  # drafts were accepted


# ---------------------------------------------------------------- a new user's first start (issues 19, 26)


@pytest.mark.parametrize(("method", "draft", "message"), [
    ("eagle_sd", None, "eagle_sd needs an EAGLE head"),
    ("classic_sd", None, "classic_sd needs a draft model"),
])
async def test_an_unavailable_method_is_refused_before_any_measurement(method, draft, message):
    profiler = FakeProfiler(steps=("measuring",))
    loader = fake_loader()
    app = make_app(loader=loader, profiler=profiler, method=method, draft_model_path=draft)
    async with app.run_test(size=(120, 36)) as pilot:
        chat = await ready(app, pilot)
        assert profiler.calls == [] and loader.configs == []
        assert any(message in text for text in chat.alerts.texts)


async def test_classic_sd_takes_its_draft_from_the_command_line():
    loader = fake_loader()
    app = make_app(loader=loader, method="classic_sd", draft_model_path="/models/draft")
    async with app.run_test(size=(120, 36)) as pilot:
        await ready(app, pilot)
        assert (loader.configs[-1].method, loader.configs[-1].draft_model_path) == ("classic_sd", "/models/draft")
    assert build_parser().parse_args(["--draft-model-path", "/d"]).draft_model_path == "/d"


async def test_the_method_can_be_switched_in_the_app_and_is_remembered():
    profiler = FakeProfiler()
    loader = fake_loader()
    store = ChatStore(Path(":memory:"))
    app = make_app(loader=loader, profiler=profiler, store=store)
    async with app.run_test(size=(120, 36)) as pilot:
        chat = await ready(app, pilot)
        app.use_method("vanilla")
        await ready(app, pilot)
        assert loader.configs[-1].method == "vanilla" and profiler.calls[-1] == (None, "vanilla", False)
        assert static_text(chat, "#chat-status").startswith("fake-model · vanilla")
        app.use_method("classic_sd")  # no draft model given: refused with a line that stays
        await pilot.pause()
        assert any("needs a draft model" in text for text in chat.alerts.texts) and len(loader.configs) == 2
        assert store.get_preference("method") == "vanilla"
        app.use_method(None)  # back to the profile's choice
        await ready(app, pilot)
        assert profiler.calls[-1] == (None, None, False)
        assert store.get_preference("method") == ""


async def test_the_status_line_names_the_profile_s_method_not_a_default():
    gate = threading.Event()
    profiler = FakeProfiler(cpu_plan("vanilla"), steps=("measuring vanilla",), gate=gate)
    app = make_app(profiler=profiler)
    async with app.run_test(size=(120, 36)) as pilot:
        await wait_until(pilot, lambda: app.measuring)
        assert "(method from the profile)" in static_text(app.chat_screen(), "#chat-status")
        gate.set()
        chat = await ready(app, pilot)
        assert static_text(chat, "#chat-status") == "fake-model · vanilla · new chat"


async def test_a_prompt_typed_while_the_model_loads_is_kept_and_sent_when_ready():
    gate = threading.Event()
    engine = FakeEngine(reply="Paris.")
    app = make_app(engine, profiler=FakeProfiler(steps=("measuring",), gate=gate))
    async with app.run_test(size=(120, 36)) as pilot:
        await wait_until(pilot, lambda: app.measuring)
        await pilot.press("f2")
        chat = app.chat_screen()
        prompt = chat.query_one(PromptInput)
        prompt.focus()
        prompt.value = "Capital of France?"
        await pilot.press("enter")
        await pilot.pause()
        (waiting,) = chat.query(UserTurn)
        assert "waiting for the model to load" in str(waiting.render())
        assert engine.seen_messages == []
        gate.set()
        await ready(app, pilot)
        await wait_until(pilot, lambda: chat.chat is not None and len(app.store.get_chat(chat.chat.id).messages) == 2)
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert transcript(chat) == [("user", "Capital of France?"), ("assistant", "Paris.")]
        assert engine.seen_messages[-1] == [{"role": "user", "content": "Capital of France?"}]


async def test_a_reply_cut_short_by_a_kill_is_marked_when_the_chat_is_reopened():
    store = ChatStore(Path(":memory:"))
    chat = store.create_chat("poem", model=None, method="vanilla")
    store.add_message(chat.id, "user", "a poem please")
    store.add_message(chat.id, "assistant", "Roses are red")  # streaming when the app was killed: no finish reason
    app = make_app(store=store)
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await ready(app, pilot)
        screen.show_chat(store.get_chat(chat.id))
        await pilot.pause()
        notice = screen.query_one(AssistantTurn).query_one(".turn-notice", Static)
        assert notice.display and "interrupted" in str(notice.render())


async def test_single_newlines_in_a_reply_are_line_breaks():
    app = make_app(FakeEngine(reply="Roses are red,\nviolets are blue.", piece_words=10))
    async with app.run_test(size=(120, 36)) as pilot:
        chat = await ready(app, pilot)
        await send(pilot, "a poem")
        paragraph = chat.query_one(AssistantTurn).query_one("MarkdownParagraph")
        assert paragraph.size.height == 2  # two lines, not one paragraph line


async def test_a_new_chat_keeps_the_settings_just_chosen():
    engine = FakeEngine(reply="ok")
    app = make_app(engine)
    async with app.run_test(size=(120, 36)) as pilot:
        await ready(app, pilot)
        await send(pilot, "first")
        await pilot.press("f5")
        await pilot.pause()
        app.screen.query_one("#max-new-tokens", Input).value = "33"
        app.screen.query_one("#save").press()
        await pilot.pause()
        await pilot.press("ctrl+n")
        await send(pilot, "second")
        assert engine.seen_sampling[-1].max_new_tokens == 33


async def test_use_model_entries_exist_before_the_models_screen_was_opened(monkeypatch):
    monkeypatch.setattr(models, "list_models", fixed_models)
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(app, pilot)
        await app.workers.wait_for_complete()
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Use model Qwen")
        await pilot.pause(0.3)
        options = [str(option.prompt) for option in app.screen.query_one("CommandList").options]
        assert any("Use model Qwen/Qwen2.5-7B-Instruct" in option for option in options)
        assert not app.get_screen("models").is_mounted


async def test_the_rate_graph_is_empty_until_there_are_rates():
    gate = threading.Event()
    app = make_app(FakeEngine(reply="a b c d", piece_words=1, gate=gate))
    async with app.run_test(size=(120, 36)) as pilot:
        chat = await ready(app, pilot)
        assert chat.query_one(Sparkline).data == []  # not one full-height bar (it scales to its own range)
        prompt = chat.query_one(PromptInput)
        prompt.focus()
        prompt.value = "go"
        await pilot.press("enter")
        for _ in range(4):
            gate.set()
            await pilot.pause(0.05)
        await app.workers.wait_for_complete()
        await pilot.pause(0.3)
        assert len(chat.query_one(Sparkline).data) >= 2


async def test_a_history_that_stops_accepting_writes_is_one_alert_and_the_chat_goes_on(tmp_path):
    store = ChatStore(tmp_path / "h.sqlite3")
    app = make_app(FakeEngine(reply="still here"), store=store)
    async with app.run_test(size=(120, 36)) as pilot:
        chat = await ready(app, pilot)
        store.db.execute("PRAGMA query_only = ON")  # the file became read-only
        await send(pilot, "hello")
        assert transcript(chat) == [("user", "hello"), ("assistant", "still here")]
        (alert,) = chat.alerts.texts
        assert alert.endswith("chats are not saved this session") and app.is_running


def test_chat_titles_are_cut_at_a_word():
    from subspec_tui.screens.chat import chat_title

    assert chat_title("What is the capital of France and why is it there, historically speaking?") == \
        "What is the capital of France and why is it…"
    assert chat_title("short  question") == "short question"
    assert len(chat_title("x" * 100)) == 49


async def test_a_conversation_that_outgrows_the_context_can_go_on_without_its_oldest_turns():
    # FakeEngine counts a token per word (+1); 150 tokens of context, 128 of them kept for the reply.
    engine = FakeEngine(reply="short answer here", max_length=150)
    app = make_app(engine)
    async with app.run_test(size=(120, 36)) as pilot:
        chat = await ready(app, pilot)
        await send(pilot, "first " * 8)
        assert "context" in static_text(chat, "#chat-status") and "of 150 tokens" in static_text(chat, "#chat-status")
        await send(pilot, "second " * 8)
        await send(pilot, "third " * 8)  # the whole conversation no longer fits: asked first
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "Continue with the oldest turns left out?" in str(app.screen.query_one("#confirm-question").render())
        app.screen.query_one("#yes").press()
        await app.workers.wait_for_complete()
        await pilot.pause()
        sent = engine.seen_messages[-1]
        assert sent[-1] == {"role": "user", "content": ("third " * 8).strip()}
        assert {"role": "user", "content": ("first " * 8).strip()} not in sent  # the oldest turn left out
        notice = chat.query(AssistantTurn).last().query_one(".turn-notice", Static)
        assert "were left out to fit the context" in str(notice.render())
        stored = app.store.get_chat(chat.chat.id).messages
        assert [m.role for m in stored] == ["user", "assistant"] * 3  # the chat keeps every turn


async def test_declining_to_leave_turns_out_keeps_the_message_and_says_why():
    engine = FakeEngine(reply="ok", max_length=140)
    app = make_app(engine)
    async with app.run_test(size=(120, 36)) as pilot:
        chat = await ready(app, pilot)
        await send(pilot, "first " * 10)
        calls = len(engine.seen_sampling)
        await send(pilot, "second " * 10)
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        app.screen.query_one("#no").press()
        await pilot.pause(0.2)
        assert len(engine.seen_sampling) == calls and not chat.generating
        assert any("not sent: the conversation is" in text for text in chat.alerts.texts)
        assert [m.role for m in app.store.get_chat(chat.chat.id).messages] == ["user", "assistant", "user"]


def test_trim_to_context_keeps_the_system_prompt_and_the_last_message():
    from subspec_tui.screens.chat import trim_to_context

    messages = [{"role": "system", "content": "s"}] + [{"role": r, "content": f"{r}{i}"} for i in range(3)
                                                       for r in ("user", "assistant")] + [{"role": "user", "content": "last"}]
    kept, dropped = trim_to_context(messages, len, 4)  # counts messages as tokens
    assert kept == [messages[0], *messages[-3:]] and dropped == 4
    with pytest.raises(ValueError):
        trim_to_context(messages, len, 1)
