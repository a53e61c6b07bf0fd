"""Text that PostgreSQL can store: its text and jsonb types refuse the NUL character (U+0000)."""

from __future__ import annotations

from app.threads.errors import InvalidField

NUL = "\x00"


def reject_nul(field: str, value: str | None) -> None:
    """Client text with NUL could never be saved: a 400 naming the field, before anything runs."""
    if value is not None and NUL in value:
        raise InvalidField(field, "must not contain the NUL character (U+0000)")


def storable(text: str) -> str:
    """Model output as stored and sent: NUL becomes U+FFFD, one character for one, so streamed
    pieces still add up to the stored reply. The token log keeps the exact ids either way."""
    return text.replace(NUL, "\ufffd")
