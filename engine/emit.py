"""Turning emitted token ids into the user's output: EOS, stop strings, length limit, streaming text.

Text is decoded from all new ids each time (tokens can merge into one character), and only the part
that is final is streamed: a trailing replacement character (half of a multi-byte character) and
any tail that could still become a stop string are held back until the next tokens decide.
"""

from __future__ import annotations

from typing import Callable


class Emitter:
    def __init__(
        self,
        tokenizer,
        eos_ids: set[int],
        max_new_tokens: int,
        stop: list[str],
        on_text: Callable[[str], None] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_new_tokens = max_new_tokens
        self.stop = [s for s in stop if s]
        self.on_text = on_text
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._streamed = 0  # characters of `text` already passed to on_text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.token_ids)

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self._stream(final=True)

    def push(self, ids: list[int]) -> int:
        """Emit `ids` in order, stopping at EOS or the length limit; returns how many were emitted
        (tokens past EOS or the limit are not)."""
        if self.max_new_tokens <= 0:
            self.finish("length")
            return 0
        for emitted, token in enumerate(ids, start=1):
            self.token_ids.append(token)
            if token in self.eos_ids:
                self._update_text()
                self.finish("eos")
                return emitted
            if len(self.token_ids) >= self.max_new_tokens:
                self._update_text()
                self.finish("length")
                return emitted
        self._update_text()
        if not self.finished:
            self._stream(final=False)
        return len(ids)

    def _update_text(self) -> None:
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        for stop in self.stop:
            at = self.text.find(stop)
            if at != -1:
                self.text = self.text[:at]
                self.finish_reason = "stop"
        if self.finish_reason == "stop":
            self._stream(final=True)

    def _stream(self, final: bool) -> None:
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):
                end -= 1
            end -= self._stop_prefix_len(self.text[:end])
        if end > self._streamed and self.on_text is not None:
            self.on_text(self.text[self._streamed : end])
        self._streamed = max(self._streamed, end)

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-n:]):
                    longest = n
                    break
        return longest
