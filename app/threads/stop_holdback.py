"""Stream text deltas that add up to exactly the final reply, stop strings included.

The engine matches stop strings on the decoded text and cuts the final text before the match, but
the tokens that spell the start of a stop string are produced (and would be streamed) before the
match is known. So a delta is sent only up to the longest tail that could still begin a stop
string; at the end the final text settles what is left. Streaming and non-streaming then give the
same text.
"""

from __future__ import annotations


class StopHoldback:
    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._text = ""  # everything the engine streamed so far
        self._sent = 0  # how much of it went out

    def push(self, text: str) -> str:
        """Take the engine's next piece of text; return what may be sent now."""
        self._text += text
        safe = len(self._text) - self._unsafe_tail()
        if safe <= self._sent:
            return ""
        delta = self._text[self._sent : safe]
        self._sent = safe
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of the final text. The engine's final text begins with what was sent."""
        sent = self._text[: self._sent]
        if not final_text.startswith(sent):
            raise ValueError(
                f"the final text does not begin with the streamed text ({len(sent)} chars sent)"
            )
        self._sent = len(final_text)
        return final_text[len(sent) :]

    def _unsafe_tail(self) -> int:
        """Length of the longest tail of the text that is a prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop), len(self._text)), longest, -1):
                if self._text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
