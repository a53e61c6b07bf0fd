"""What the turn service needs from the inference side, as protocols (no torch imported here).

The real objects are app.engine.runtime.async_engine.AsyncLLMEngine and the loaded model's chat
format (app.chat's ChatFormat); the factory in app/threads/runtime_factory.py builds them from
settings and wraps them in a `ModelRuntime`. Tests may hand in any object with these methods.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from app.chat.chat_format import ChatFormat
from app.engine.runtime.types import SamplingParams, StreamEvent


class TurnEngine(Protocol):
    def generate(
        self,
        thread_key: str,
        history_ids: Sequence[int],
        new_ids: Sequence[int],
        params: SamplingParams,
        *,
        first_turn: bool,
        share_scope: str | None = None,
    ) -> AsyncIterator[StreamEvent]: ...

    def commit_turn(self, thread_key: str, *, num_log_tokens: int | None = None) -> None: ...

    def rollback_turn(self, thread_key: str) -> None: ...

    def forget_thread(self, thread_key: str) -> None: ...

    # A new thread whose log is token_ids holds the parent's KV of it (shared blocks).
    async def fork_thread(
        self, parent_key: str, child_key: str, token_ids: Sequence[int]
    ) -> int: ...

    # The thread's log was cut back to token_ids: keep the KV of the rest (raises while busy).
    async def rewind_thread(self, thread_key: str, token_ids: Sequence[int]) -> int: ...

    def thread_state(self, thread_key: str) -> Any: ...  # .resident, .cached_tokens

    def shutdown(self) -> None: ...  # aborts turns in flight; blocks until the engine stopped


@dataclass(frozen=True)
class ModelRuntime:
    """The one model this server runs: its engine and what the service needs to talk to it."""

    name: str  # the model name threads and ledger rows record
    engine: TurnEngine
    chat_format: ChatFormat
    max_context_tokens: int  # prompt + generated tokens of one turn may not exceed this
    default_max_tokens: int = 256
    share_across_accounts: bool = False  # KVTHREADS_SHARE_ACROSS_ACCOUNTS

    def share_scope(self, account_id: str) -> str:
        """Whose threads may share KV blocks with this account's: its own, unless the
        operator allows sharing across accounts."""
        return "*" if self.share_across_accounts else f"account:{account_id}"
