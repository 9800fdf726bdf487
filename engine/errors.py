"""The one exception type front ends catch: its message is a single line meant for the user."""


class EngineError(Exception):
    """An expected failure (bad model path, corrupt weights, plan that does not fit...).

    Front ends print ``str(err)`` on one line and exit 1 (CLI), answer 4xx (API) or show a
    notification (TUI). Anything else escaping the engine is a bug.
    """
