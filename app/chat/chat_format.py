"""Chat formats: the token pieces a thread's log is built from.

A thread's token log is built once, piece by piece, and never re-rendered (DESIGN invariant 1):

    start(system)                        when the thread is created: BOS, the system message
    user_turn(content)                   each user message and the assistant header after it
    <the generated ids>                  exactly as sampled
    assistant_end(generated, reason)     what closes the assistant message

`TemplateChatFormat` derives the pieces from a Hugging Face Jinja chat template by rendering
conversations as text and taking the differences, then tokenizing each piece once. At load it
probes whether the pieces, joined, equal the whole conversation rendered and tokenized at once;
when they do not (a template that rewrites old turns, or tokens that merge across a piece
boundary) it logs a WARNING and sets `is_incremental_exact = False`. The log stays the truth
either way; it just is not what a stateless server would have re-rendered.

`SimpleChatFormat` is the built-in models' format: special tokens around UTF-8 bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from app.chat.chat_template import ChatTemplate, ChatTemplateError
from app.chat.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length")


@runtime_checkable
class ChatFormat(Protocol):
    stop_token_ids: frozenset[int]  # end-of-turn / eos tokens: generation stops on these
    is_incremental_exact: bool  # pieces joined == the whole conversation rendered at once

    def start(self, system: str | None) -> list[int]:
        """Tokens that open a thread (BOS, the system message if any)."""
        ...

    def user_turn(self, content: str) -> list[int]:
        """A user message followed by the assistant header."""
        ...

    def user_message(self, content: str) -> list[int]:
        """A user message without the assistant header: one that no reply follows yet."""
        ...

    def assistant_message(self, content: str) -> list[int]:
        """A whole assistant message given as text: header, content, closing (as a reply to
        user_message, the way user_turn + generated + assistant_end would hold it)."""
        ...

    def assistant_end(self, generated: Sequence[int], finish_reason: str) -> list[int]:
        """Tokens to append after `generated` so the assistant message is closed as the template
        renders it; when the model already generated the end-of-turn token, only what follows it."""
        ...


def _check_finish_reason(finish_reason: str) -> None:
    if finish_reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {finish_reason!r}")


def _closing_rest(
    closing: list[int], end_of_turn: int | None, generated: Sequence[int]
) -> list[int]:
    """The closing tokens still owed after `generated`: all of them, or, when the model ended
    with the end-of-turn token itself, only those that follow it in the closing."""
    if end_of_turn is not None and generated and generated[-1] == end_of_turn:
        return closing[closing.index(end_of_turn) + 1 :]
    return list(closing)


class SimpleChatFormat:
    """`<|bos|>[<|system|>text<|end|>]` then `<|user|>text<|end|><|assistant|>` ... `<|end|>`."""

    SPECIAL_TOKENS = ("<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")

    def __init__(self, tokenizer: Tokenizer) -> None:
        ids = {name: tokenizer.token_to_id(name) for name in self.SPECIAL_TOKENS}
        missing = [name for name, token_id in ids.items() if token_id is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self._tokenizer = tokenizer
        self._bos, self._end = ids["<|bos|>"], ids["<|end|>"]
        self._system, self._user, self._assistant = (
            ids["<|system|>"],
            ids["<|user|>"],
            ids["<|assistant|>"],
        )
        self.stop_token_ids = frozenset({self._end})
        self.is_incremental_exact = True  # token-level by construction: nothing spans a boundary

    def start(self, system: str | None) -> list[int]:
        if system is None:
            return [self._bos]
        return [self._bos, self._system, *self._tokenizer.encode(system), self._end]

    def user_turn(self, content: str) -> list[int]:
        return [self._user, *self._tokenizer.encode(content), self._end, self._assistant]

    def user_message(self, content: str) -> list[int]:
        return [self._user, *self._tokenizer.encode(content), self._end]

    def assistant_message(self, content: str) -> list[int]:
        return [self._assistant, *self._tokenizer.encode(content), self._end]

    def assistant_end(self, generated: Sequence[int], finish_reason: str) -> list[int]:
        _check_finish_reason(finish_reason)
        return _closing_rest([self._end], self._end, generated)


# Sentinel texts used to cut renders into pieces; unlikely to be touched by a template.
_ANCHOR_USER = "kvthreads anchor question"
_ANCHOR_REPLY = "kvthreads anchor reply"

# The conversation the load-time probe renders both ways. The first reply carries a reasoning
# block because templates that strip reasoning from old turns are the usual way to lose
# prefix-stability.
_PROBE_SYSTEM = "You are a helpful assistant."
_PROBE_TURNS = (
    ("Hello! Who are you?", "<think>\nThe user greets me.\n</think>\n\nI am an assistant."),
    ("Tell me a joke, please.", "Why did the chicken cross the road? To get to the other side."),
    ("Ha. One more?", None),
)


class TemplateChatFormat:
    """Pieces cut from renders of a Hugging Face chat template.

    Pieces are cut at the anchor reply R of a fixed two-message conversation B = [user, R]:

        render(B)                         = ... R + closing
        render(B + [user(c)], gen=True)   = ... R + closing + user_piece(c)
        render([system?, user(c)], gen=True) = start_piece(system) + user_piece(c)

    Anchoring on R (not on render(B) being a prefix) keeps the pieces right for templates that
    render an old assistant turn differently from the last one (e.g. Qwen3's reasoning block).
    """

    def __init__(
        self,
        template: ChatTemplate,
        tokenizer: Tokenizer,
        eos_token_ids: frozenset[int] = frozenset(),
        model_name: str = "model",
    ) -> None:
        self._template = template
        self._tokenizer = tokenizer
        self.model_name = model_name
        closing_text = self._closing_text()
        self._anchor_closing = _ANCHOR_REPLY + closing_text
        self._closing = closing_text
        self._closing_ids = tokenizer.encode(closing_text)
        # The end-of-turn token: the first special token of the closing (<|im_end|> in
        # "<|im_end|>\n", <|eot_id|>, </s> in Llama 2's " </s>").
        self._end_of_turn = next(
            (t for t in self._closing_ids if t in tokenizer.special_token_ids), None
        )
        stop = set(eos_token_ids)
        if self._end_of_turn is not None:
            stop.add(self._end_of_turn)
        if not stop:
            raise ChatTemplateError(
                f"{model_name}: no stop token: the template's closing {closing_text!r} has no "
                "special token and no eos token is known"
            )
        self.stop_token_ids = frozenset(stop)
        self.probe_failure = self._probe()
        self.is_incremental_exact = self.probe_failure is None
        if self.probe_failure is not None:
            logger.warning(
                "chat template of %s is not prefix-stable: %s. Thread logs stay exact (history is "
                "never re-rendered), but they differ from a whole-conversation render.",
                model_name,
                self.probe_failure,
            )

    # -- the interface --------------------------------------------------------------------

    def start(self, system: str | None) -> list[int]:
        return self._tokenizer.encode(self._start_text(system))

    def user_turn(self, content: str) -> list[int]:
        return self._tokenizer.encode(self._user_text(content))

    def user_message(self, content: str) -> list[int]:
        return self._tokenizer.encode(self._user_message_text(content))

    def assistant_message(self, content: str) -> list[int]:
        header = self._user_text(content)[len(self._user_message_text(content)) :]
        return self._tokenizer.encode(header + content + self._closing)

    def assistant_end(self, generated: Sequence[int], finish_reason: str) -> list[int]:
        _check_finish_reason(finish_reason)
        return _closing_rest(self._closing_ids, self._end_of_turn, generated)

    # -- the text pieces --------------------------------------------------------------------

    def _closing_text(self) -> str:
        """What the template renders after an assistant message's content."""
        rendered = self._render(_anchor_conversation(), add_generation_prompt=False)
        cut = rendered.rfind(_ANCHOR_REPLY)
        if cut < 0:
            raise ChatTemplateError(
                f"{self.model_name}: the chat template does not render assistant messages"
            )
        return rendered[cut + len(_ANCHOR_REPLY) :]

    def _user_text(self, content: str) -> str:
        rendered = self._render(
            [*_anchor_conversation(), {"role": "user", "content": content}],
            add_generation_prompt=True,
        )
        cut = rendered.rfind(self._anchor_closing)
        if cut < 0:
            raise ChatTemplateError(
                f"{self.model_name}: the chat template renders an earlier assistant message "
                "with a different closing than the last one; cannot cut a user turn from it"
            )
        return rendered[cut + len(self._anchor_closing) :]

    def _user_message_text(self, content: str) -> str:
        """The user piece without the generation prompt; user_turn's text must extend it."""
        rendered = self._render(
            [*_anchor_conversation(), {"role": "user", "content": content}],
            add_generation_prompt=False,
        )
        cut = rendered.rfind(self._anchor_closing)
        text = rendered[cut + len(self._anchor_closing) :] if cut >= 0 else ""
        if cut < 0 or not self._user_text(content).startswith(text):
            raise ChatTemplateError(
                f"{self.model_name}: the chat template's generation prompt does not follow a "
                "user message as is; a user message cannot stand without its reply"
            )
        return text

    def _start_text(self, system: str | None) -> str:
        opening = [] if system is None else [{"role": "system", "content": system}]
        rendered = self._render(
            [*opening, {"role": "user", "content": _ANCHOR_USER}], add_generation_prompt=True
        )
        user_text = self._user_text(_ANCHOR_USER)
        if not rendered.endswith(user_text):
            # E.g. Llama 2 folds the system prompt into the first user message.
            raise ChatTemplateError(
                f"{self.model_name}: the chat template renders the first user message differently "
                "from later ones; a thread cannot be opened before its first message"
            )
        return rendered[: len(rendered) - len(user_text)]

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self._template.render(messages, add_generation_prompt=add_generation_prompt)

    # -- the load-time probe ----------------------------------------------------------------

    def _probe(self) -> str | None:
        """None when incremental pieces equal whole renders, else why they differ."""
        for system in (_PROBE_SYSTEM, None):
            try:
                failure = self._probe_conversation(system)
            except ChatTemplateError as exc:
                return str(exc)
            if failure is not None:
                return failure
        return None

    def _probe_conversation(self, system: str | None) -> str | None:
        messages = [] if system is None else [{"role": "system", "content": system}]
        text_pieces = [self._start_text(system)]
        id_pieces = [self.start(system)]
        for user, reply in _PROBE_TURNS:
            messages.append({"role": "user", "content": user})
            text_pieces.append(self._user_text(user))
            id_pieces.append(self.user_turn(user))
            if reply is None:
                break
            messages.append({"role": "assistant", "content": reply})
            generated = self._tokenizer.encode(reply)
            text_pieces += [reply, self._closing]
            id_pieces += [generated, self.assistant_end(generated, "length")]

        whole_text = self._render(messages, add_generation_prompt=True)
        joined_text = "".join(text_pieces)
        with_system = "with" if system is not None else "without"
        if whole_text != joined_text:
            at = _first_difference(whole_text, joined_text)
            return (
                f"rendering the conversation ({with_system} a system message) whole and turn by "
                f"turn gives different text from char {at}: whole {whole_text[at : at + 40]!r} "
                f"vs incremental {joined_text[at : at + 40]!r}"
            )
        whole_ids = self._tokenizer.encode(whole_text)
        joined_ids = [token_id for piece in id_pieces for token_id in piece]
        if whole_ids != joined_ids:
            at = _first_difference(whole_ids, joined_ids)
            return (
                f"tokenizing the conversation ({with_system} a system message) whole and piece "
                f"by piece gives different tokens from token {at}: whole "
                f"{whole_ids[at : at + 8]} vs incremental {joined_ids[at : at + 8]}"
            )
        return None


def _anchor_conversation() -> list[dict[str, str]]:
    return [
        {"role": "user", "content": _ANCHOR_USER},
        {"role": "assistant", "content": _ANCHOR_REPLY},
    ]


def _first_difference(a: Sequence, b: Sequence) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))
