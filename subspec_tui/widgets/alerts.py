"""Errors that stay: a bar of alerts on the screen they concern, each kept until the user
dismisses it (a click on it, or ctrl+l for all), unlike toasts that vanish in seconds."""

from __future__ import annotations

from textual.containers import Vertical
from textual.widgets import Static


class Alert(Static):
    """One alert: the whole text wraps (never cut mid-word); a click dismisses it."""

    def __init__(self, text: str, severity: str = "error") -> None:
        super().__init__(f"{text}  (click or ctrl+l to dismiss)", markup=False, classes=f"alert alert-{severity}")
        self.text = text

    def on_click(self) -> None:
        self.remove()


class AlertBar(Vertical):
    """The alerts of one screen, newest last; an alert already shown is not added twice."""

    def add(self, text: str, severity: str = "error") -> None:
        if any(alert.text == text for alert in self.query(Alert)):
            return
        self.mount(Alert(text, severity))

    def clear(self) -> None:
        self.query(Alert).remove()

    @property
    def texts(self) -> list[str]:
        return [alert.text for alert in self.query(Alert)]


class ScreenAlerts:
    """For a screen with an AlertBar: alerts raised before the screen is composed (an error at
    start-up) wait and are shown once it is."""

    _early_alerts: list[tuple[str, str]] | None = None

    @property
    def alerts(self) -> AlertBar:
        return self.query_one(AlertBar)  # type: ignore[attr-defined]

    def alert(self, text: str, severity: str = "error") -> None:
        if self.query(AlertBar):  # type: ignore[attr-defined]
            self.alerts.add(text, severity)
        else:
            self._early_alerts = [*(self._early_alerts or []), (text, severity)]

    def show_early_alerts(self) -> None:
        for text, severity in self._early_alerts or []:
            self.alerts.add(text, severity)
        self._early_alerts = None
