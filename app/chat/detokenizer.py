"""Incremental detokenization of generated tokens, with stop strings.

Text comes from a plain `decode(ids) -> str` function. Each new token's text is the difference
between decoding a short window of recent ids with and without it (so leading spaces and
multi-token characters come out right); while the window decodes to a partial UTF-8 character
(U+FFFD at the end) no text is released.

Stop strings are matched on the decoded text. Text that might be the start of a stop string is
held back until it is known not to be one, so the pieces handed out always add up to the final
text, which is cut before the stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]

# Prompt ids kept as left context for the first generated tokens (a word's leading space
# depends on what precedes it).
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, decode: Decode, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._decode = decode
        self._stop = tuple(stop)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.text = ""  # the decoded text so far (cut before a stop string once one matched)
        self._num_emitted = 0  # characters of text already handed out
        self.stopped = False  # a stop string matched

    def add(self, token_id: int) -> str:
        """Decode one more generated token; return the text that is now safe to hand out."""
        if self.stopped:
            raise RuntimeError("a stop string already matched")
        self._ids.append(token_id)
        self._extend(self._advance(final=False))
        if self.stopped:
            return self.flush()
        safe = len(self.text) - self._held_back()
        piece = self.text[self._num_emitted : safe]
        self._num_emitted = max(self._num_emitted, safe)
        return piece

    def flush(self) -> str:
        """Everything not handed out yet (the sequence is finishing), a trailing partial
        character included (as U+FFFD)."""
        if not self.stopped:
            self._extend(self._advance(final=True))
        piece = self.text[self._num_emitted :]
        self._num_emitted = len(self.text)
        return piece

    def _advance(self, final: bool) -> str:
        """The text the ids past the read offset complete ("" while a character is partial)."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def _extend(self, delta: str) -> None:
        """Append decoded text; on a stop string, cut the text before it."""
        if not delta:
            return
        search_from = max(0, len(self.text) - self._max_stop_len + 1)
        self.text += delta
        cut = self._find_stop(search_from)
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True

    def _find_stop(self, search_from: int) -> int | None:
        hits = [i for s in self._stop if (i := self.text.find(s, search_from)) >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        longest = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest
