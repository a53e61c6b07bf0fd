"""What can go wrong in a thread operation, as plain exceptions the API layer maps to HTTP.

Each error carries a stable `type` (the `error.type` of the JSON body); the status code is the
API layer's business (app/api/errors.py), so this package stays free of HTTP.
"""

from __future__ import annotations


class ThreadsError(Exception):
    type = "invalid_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ThreadNotFound(ThreadsError):
    type = "not_found"

    def __init__(self, thread_id: str) -> None:
        super().__init__(f"no thread {thread_id!r}")


class ThreadBusy(ThreadsError):
    type = "thread_busy"

    def __init__(self, thread_id: str) -> None:
        super().__init__(
            f"thread {thread_id!r} has a turn in flight; wait for it to finish and retry"
        )


class InvalidField(ThreadsError):
    """A value that passed the schema but not the limits known only at run time."""

    type = "invalid_request"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class MessageTooLarge(ThreadsError):
    type = "message_too_large"

    def __init__(self, num_bytes: int, limit: int) -> None:
        super().__init__(f"content is {num_bytes} bytes of UTF-8, over the limit of {limit} bytes")


class ContextLengthExceeded(ThreadsError):
    type = "context_length_exceeded"

    def __init__(
        self, *, thread_tokens: int, message_tokens: int, max_tokens: int, limit: int
    ) -> None:
        super().__init__(
            f"the thread holds {thread_tokens} tokens and the message adds {message_tokens}; "
            f"with max_tokens {max_tokens} that is {thread_tokens + message_tokens + max_tokens}, "
            f"over the model's context of {limit} tokens (history is never truncated: start a "
            f"new thread or ask for fewer max_tokens)"
        )


class IdempotencyKeyReused(ThreadsError):
    type = "idempotency_key_reused"

    def __init__(self, key: str) -> None:
        super().__init__(
            f"Idempotency-Key {key!r} was already used with a different request; "
            "use a new key for a new request"
        )


class GenerationFailed(ThreadsError):
    type = "generation_failed"

    def __init__(self, reason: str) -> None:
        super().__init__(f"generation failed, nothing was saved: {reason}")


class IdempotencyConflict(ThreadsError):
    type = "idempotency_conflict"

    def __init__(self, key: str) -> None:
        super().__init__(
            f"another request with Idempotency-Key {key!r} completed while this one ran; "
            "nothing of this one was saved: retry to get the first result"
        )


class LimitExceeded(ThreadsError):
    """A per-account limit; `retry_after_s` says when trying again may succeed."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyTurnsInFlight(LimitExceeded):
    type = "too_many_turns_in_flight"

    def __init__(self, limit: int, retry_after_s: int) -> None:
        super().__init__(
            f"this account already has {limit} turns in flight, its limit; "
            "wait for one to finish and retry",
            retry_after_s,
        )


class BudgetExceeded(LimitExceeded):
    type = "budget_exceeded"

    def __init__(self, kind: str, used: str, budget: str, retry_after_s: int) -> None:
        super().__init__(
            f"this account's monthly {kind} budget is used up ({used} of {budget}); "
            "it renews at the start of next month (UTC)",
            retry_after_s,
        )
        self.kind = kind
