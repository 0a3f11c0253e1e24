"""The text of one choice, grown from the engine's committed tokens.

Text only ever grows: text ending in U+FFFD (an incomplete multi-byte character) and any tail that
could still become a stop string are held back. A stop string ends the choice; nothing from it
onwards is returned, and usage counts the tokens up to and including the one that completed it.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    """What ``ChoiceText`` needs of the model's tokenizer."""

    def decode(self, ids: list[int]) -> str: ...


class ChoiceText:
    """Text of one choice, grown from committed tokens; see the module docstring."""

    def __init__(self, tokenizer: Decoder, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self._longest_stop = max((len(s) for s in stop), default=0)
        self.token_ids: list[int] = []
        self.text = ""  # decoded text of all tokens (up to the stop string, once one is found)
        self.sent = 0  # characters of ``text`` already returned
        self.stop_hit: str | None = None
        self.tokens_to_stop: int | None = None  # usage when a stop string ended the choice
        self._searched = 0  # stop strings cannot start before this offset any more

    def add(self, token_ids: list[int]) -> str:
        """Feed newly committed tokens; the text that may now be sent."""
        for token in token_ids:
            if self.stop_hit is not None:
                break
            self.token_ids.append(token)
            if not self.stop:
                continue
            self.text = self.tokenizer.decode(self.token_ids)
            self._find_stop()
        if not self.stop and token_ids:
            self.text = self.tokenizer.decode(self.token_ids)
        return self._take(final=self.stop_hit is not None)

    def finish(self) -> str:
        """The rest of the text when the choice is over."""
        return self._take(final=True)

    def _find_stop(self) -> None:
        start = max(0, self._searched - self._longest_stop + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            pos = self.text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is not None:
            self.stop_hit = best[1]
            self.tokens_to_stop = len(self.token_ids)
            self.text = self.text[: best[0]]
        else:
            self._searched = len(self.text.rstrip(REPLACEMENT))

    def _safe_end(self, final: bool) -> int:
        end = len(self.text)
        if final:  # nothing more will come: bytes still invalid now stay U+FFFD, as in a full decode
            return end
        while end > self.sent and self.text[end - 1] == REPLACEMENT:
            end -= 1  # maybe an incomplete multi-byte character: wait for its remaining bytes
        if not self.stop:
            return end
        for keep in range(min(self._longest_stop - 1, end - self.sent), 0, -1):
            tail = self.text[end - keep : end]
            if any(s.startswith(tail) for s in self.stop):
                return end - keep  # might be the start of a stop string
        return end

    def _take(self, final: bool) -> str:
        end = self._safe_end(final)
        if end <= self.sent:
            return ""
        out = self.text[self.sent : end]
        self.sent = end
        return out

    def completion_tokens(self, stopped_on_token: bool) -> int:
        """Usage: tokens returned, plus the stop token; up to the stop string's last token if one hit."""
        if self.tokens_to_stop is not None:
            return self.tokens_to_stop
        return len(self.token_ids) + int(stopped_on_token)
