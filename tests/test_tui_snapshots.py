"""SVG snapshots of the main screens (pytest-textual-snapshot), with a fake engine and fixed data.

Update after an intended visual change: pytest tests/test_tui_snapshots.py --snapshot-update
"""

from __future__ import annotations

import itertools

import pytest

from subspec_tui import models
from subspec_tui.app import SubSpecChatApp
from subspec_tui.widgets import stats_panel
from test_tui_app import fixed_models
from tui_fake_engine import FAKE_GPU, FakeEngine, FakeProfiler, fake_loader, gpu_plan

SIZE = (120, 36)


class SteppingClock:
    """Each reading is 0.1 s after the previous one: rates in the stats panel are reproducible."""

    def __init__(self) -> None:
        self._ticks = itertools.count()

    def monotonic(self) -> float:
        return next(self._ticks) * 0.1


@pytest.fixture(autouse=True)
def fixed_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBSPEC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(stats_panel, "time", SteppingClock())
    monkeypatch.setattr(models, "list_models", fixed_models)


def make_app() -> SubSpecChatApp:
    engine = FakeEngine(reply="The capital of **France** is Paris.\n\n- one\n- two", piece_words=1)
    return SubSpecChatApp(engine_loader=fake_loader(engine), gpu=("Fake GPU", 8 * 1024**3),
                          profiler=FakeProfiler(gpu_plan(), device=FAKE_GPU))


async def settle(pilot) -> None:
    # The engine worker starts only once the profile worker has ended: wait for the whole chain.
    for _ in range(500):
        if not pilot.app.engine_loading:
            break
        await pilot.pause(0.01)
    assert not pilot.app.engine_loading, "the fake engine never loaded"
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()
    pilot.app.clear_notifications()
    await pilot.pause()


async def reply_finished(pilot) -> None:
    """Wait for the Finished message itself (not wall time: CI machines are slow), then redraw stats."""
    screen = pilot.app.chat_screen()
    for _ in range(500):
        if not screen.generating:
            break
        await pilot.pause(0.01)
    assert not screen.generating, "the fake reply never finished"
    screen.query_one(stats_panel.StatsPanel).refresh_stats()
    await pilot.pause()


def test_chat_screen_after_a_reply(snap_compare):
    async def run_before(pilot) -> None:
        await settle(pilot)
        prompt = pilot.app.chat_screen().query_one("#prompt")
        prompt.focus()
        prompt.value = "What is the capital of France?"
        await pilot.press("enter")
        await settle(pilot)
        await reply_finished(pilot)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=run_before)


def test_models_screen(snap_compare):
    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.press("f3")
        await pilot.pause()  # the screen mounts and starts its listing worker
        await settle(pilot)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=run_before)


def test_profile_screen(snap_compare):
    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.press("f4")
        await settle(pilot)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=run_before)


def test_help_screen(snap_compare):
    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.press("f1")
        await settle(pilot)

    assert snap_compare(make_app(), terminal_size=(120, 48), run_before=run_before)
