"""The live statistics panel: tau, tokens/s, draft/verify/transfer split, accepted-length histogram.

Engine callbacks arrive on the generation thread for every iteration; `LiveStats` only
accumulates them (under a lock) and the panel redraws from a 10 Hz timer when something changed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Sparkline, Static

from engine import IterationStats

REFRESH_HZ = 10
RATE_SAMPLES = 60
HISTOGRAM_WIDTH = 14


@dataclass
class StatsSnapshot:
    iterations: int = 0
    emitted: int = 0
    last_tau: float | None = None
    draft_ms: float | None = None  # running means
    verify_ms: float | None = None
    transfer_ms: float | None = None
    tok_per_s: float | None = None
    rates: list[float] = field(default_factory=list)
    accepted: Counter = field(default_factory=Counter)

    @property
    def mean_tau(self) -> float | None:
        return self.emitted / self.iterations if self.iterations else None

    @property
    def transfer_share(self) -> float | None:
        """Transfer time as a fraction of the iteration (draft + verify)."""
        if self.transfer_ms is None or self.verify_ms is None:
            return None
        total = (self.draft_ms or 0.0) + self.verify_ms
        return self.transfer_ms / total if total > 0 else None


class LiveStats:
    """Thread-safe accumulator of IterationStats for one generation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = 0
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._snapshot = StatsSnapshot()
            self._sums: dict[str, tuple[float, int]] = {}
            self._rates: deque[float] = deque(maxlen=RATE_SAMPLES)
            self._last_time: float | None = None
            self._first_time: float | None = None
            self._after_first = 0
            self._version += 1

    def add(self, it: IterationStats) -> None:
        now = time.monotonic()
        with self._lock:
            snap = self._snapshot
            snap.iterations += 1
            snap.emitted += it.emitted
            snap.last_tau = float(it.emitted)
            snap.accepted[it.emitted] += 1
            for name in ("draft_ms", "verify_ms", "transfer_ms"):
                value = getattr(it, name)
                if value is not None:
                    total, count = self._sums.get(name, (0.0, 0))
                    self._sums[name] = (total + value, count + 1)
                    setattr(snap, name, (total + value) / (count + 1))
            # Wall-clock rates between callbacks: the first iteration also carries the prefill.
            if self._last_time is not None:
                elapsed = now - self._last_time
                if elapsed > 0:
                    self._rates.append(it.emitted / elapsed)
                self._after_first += it.emitted
                snap.tok_per_s = self._after_first / (now - self._first_time)
            else:
                self._first_time = now
            self._last_time = now
            snap.rates = list(self._rates)
            self._version += 1

    def finish(self, tok_per_s: float) -> None:
        """The engine's own decode rate replaces the wall-clock estimate at the end."""
        with self._lock:
            self._snapshot.tok_per_s = tok_per_s
            self._version += 1

    def read(self) -> tuple[int, StatsSnapshot]:
        with self._lock:
            snap = self._snapshot
            copy = StatsSnapshot(**{**snap.__dict__, "rates": list(snap.rates), "accepted": Counter(snap.accepted)})
            return self._version, copy


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def histogram_lines(accepted: Counter, width: int = HISTOGRAM_WIDTH) -> list[str]:
    """One bar per accepted length (tokens per verification), scaled to the most frequent."""
    if not accepted:
        return ["(no iterations yet)"]
    peak = max(accepted.values())
    lines = []
    for length in range(1, max(accepted) + 1):
        count = accepted.get(length, 0)
        bar = "█" * round(width * count / peak)
        lines.append(f"{length:>3} {bar:<{width}} {count}")
    return lines


class StatsPanel(Vertical):
    """Beside the chat: what the engine is doing, refreshed at most REFRESH_HZ times a second."""

    def __init__(self, live: LiveStats, **kwargs) -> None:
        super().__init__(**kwargs)
        self.live = live
        self._shown_version = -1
        self.device_line = "no model loaded"

    def compose(self) -> ComposeResult:
        yield Label("Engine", classes="panel-title")
        yield Static(self.device_line, id="stats-device")
        yield Static(id="stats-figures")
        yield Label("tokens/s", classes="panel-title")
        yield Sparkline([], id="stats-rate")
        yield Label("accepted length", classes="panel-title")
        yield Static(id="stats-histogram")

    def on_mount(self) -> None:
        self.set_interval(1 / REFRESH_HZ, self.refresh_stats)
        self.refresh_stats()

    def set_engine(self, describe: dict | None) -> None:
        self.device_line = device_summary(describe)
        self.query_one("#stats-device", Static).update(self.device_line)
        self._shown_version = -1
        self.refresh_stats()

    def refresh_stats(self) -> None:
        version, snap = self.live.read()
        if version == self._shown_version:
            return
        self._shown_version = version
        self.query_one("#stats-figures", Static).update(figures_text(snap, self.device_line))
        # One rate alone would draw as full-height blocks (a sparkline scales to its own range).
        self.query_one("#stats-rate", Sparkline).data = snap.rates if len(snap.rates) >= 2 else []
        self.query_one("#stats-histogram", Static).update("\n".join(histogram_lines(snap.accepted)))


def device_summary(describe: dict | None) -> str:
    if describe is None:
        return "no model loaded"
    method = describe.get("method", "?")
    device = str(describe.get("device", "?"))
    if device == "cpu":
        return f"{method} · CPU, no offload"
    on_gpu, total = describe.get("layers_on_gpu"), describe.get("layers_total")
    layers = f"{on_gpu}/{total} layers on GPU" if on_gpu is not None and total else "layers ?"
    return f"{method} · {device} · {layers}"


def figures_text(snap: StatsSnapshot, device_line: str) -> str:
    tau_last = "–" if snap.last_tau is None else f"{snap.last_tau:.0f}"
    tau_mean = "–" if snap.mean_tau is None else f"{snap.mean_tau:.2f}"
    rate = "–" if snap.tok_per_s is None else f"{snap.tok_per_s:.1f}"
    if snap.transfer_ms is None:
        transfer = "n/a (CPU, no offload)" if "CPU" in device_line else "n/a (all layers resident)"
    else:
        share = snap.transfer_share
        transfer = _ms(snap.transfer_ms) + (f" ({share:.0%} of iteration)" if share is not None else "")
    return "\n".join([
        f"tau last/mean  {tau_last} / {tau_mean}",
        f"tokens/s       {rate}",
        f"iterations     {snap.iterations}",
        f"draft          {_ms(snap.draft_ms)}",
        f"verify         {_ms(snap.verify_ms)}",
        f"transfer       {transfer}",
    ])
