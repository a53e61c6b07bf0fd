"""Message items -> tokens, through the model's ChatFormat pieces; history is never re-rendered.

    new_ids = turn_tokens(fmt, [("user", "Hi"), ("assistant", "Hello"), ("user", "Again")])
            = fmt.user_message("Hi") + fmt.assistant_message("Hello") + fmt.user_turn("Again")

A turn's input ends with a user message, rendered with the assistant header the reply follows
(`user_turn`, the native API's own piece: one user message gives the same tokens as
POST /v1/threads/{id}/messages). Earlier items are closed messages. System and developer items
exist only at a thread's start: they and `instructions` become its system prompt (`start`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.chat.chat_format import ChatFormat
from app.openai import schemas
from app.openai.errors import OpenAIError

SYSTEM_ROLES = ("system", "developer")


@dataclass(frozen=True)
class Item:
    role: str  # user, assistant, system, developer
    text: str
    id: str | None = None


def item_text(content: str | list, param: str) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(part.text for part in content)


def message_items(messages: Sequence[schemas.InputMessage], param: str) -> list[Item]:
    return [
        Item(m.role, item_text(m.content, f"{param}[{i}].content"), m.id)
        for i, m in enumerate(messages)
    ]


def split_system(items: list[Item], param: str, *, allowed: bool) -> tuple[list[str], list[Item]]:
    """The leading system/developer texts and the rest; a system item elsewhere is a 400."""
    head = 0
    while allowed and head < len(items) and items[head].role in SYSTEM_ROLES:
        head += 1
    for i, item in enumerate(items[head:], start=head):
        if item.role in SYSTEM_ROLES:
            where = "after other items" if allowed else "in an existing conversation or chain"
            raise OpenAIError.bad_request(
                f"a {item.role} message {where} is not supported: the token log is exact and "
                "the system prompt opens the thread (put it first, or in `instructions`, on a "
                "new conversation)",
                param=f"{param}[{i}].role",
            )
    return [item.text for item in items[:head]], items[head:]


def system_prompt(parts: list[str | None]) -> str | None:
    texts = [p for p in parts if p]
    return "\n\n".join(texts) if texts else None


def turn_tokens(fmt: ChatFormat, items: list[Item], param: str) -> list[int]:
    """The new tokens of a turn answering `items` (the last must be a user message)."""
    if not items or items[-1].role != "user":
        raise OpenAIError.bad_request(
            "the last message must be a user message: the model replies to it", param=param
        )
    ids = closed_tokens(fmt, items[:-1])
    return ids + fmt.user_turn(items[-1].text)


def closed_tokens(fmt: ChatFormat, items: list[Item]) -> list[int]:
    ids: list[int] = []
    for item in items:
        ids += item_tokens(fmt, item)
    return ids


def item_tokens(fmt: ChatFormat, item: Item) -> list[int]:
    """One closed message: a user message no reply follows yet, or a whole assistant message."""
    if item.role == "user":
        return fmt.user_message(item.text)
    return fmt.assistant_message(item.text)


def generation_prompt(fmt: ChatFormat) -> list[int] | None:
    """The assistant header user_turn adds after user_message (None if it is not a clean
    suffix under this tokenizer)."""
    whole, message = fmt.user_turn("x"), fmt.user_message("x")
    if whole[: len(message)] != message or len(whole) == len(message):
        return None
    return whole[len(message) :]
