"""A pure-Python engine with the AsyncLLMEngine contract, for tests that need to control failures.

It keeps per-thread "KV" as the list of token ids it would hold, with the real engine's rules:
the prompt plus all generated tokens but the last stay cached after commit_turn; rollback_turn
and an early close go back to the history; a pinned thread refuses a second generate. The reply
is the text `reply to N tokens` (N = prompt length) or the one given, byte tokens then the end
token.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from app.chat.chat_format import SimpleChatFormat
from app.chat.tokenizer import ByteTokenizer
from app.engine.runtime.types import FinishEvent, MissReason, SamplingParams, TokenEvent, TurnCounts
from app.threads.ports import ModelRuntime

SPECIALS = SimpleChatFormat.SPECIAL_TOKENS


@dataclass
class FakeThreadState:
    resident: bool
    cached_tokens: int


class FakeEngine:
    def __init__(
        self,
        *,
        delay_s: float = 0.0,
        fail_after_tokens: int | None = None,
        reply: str | None = None,
    ) -> None:
        self.tokenizer = ByteTokenizer(SPECIALS)
        self.chat_format = SimpleChatFormat(self.tokenizer)
        self.end_id = self.tokenizer.token_to_id("<|end|>")
        self.delay_s = delay_s
        self.fail_after_tokens = fail_after_tokens
        self.reply = reply  # the reply's text, instead of "reply to N tokens"
        # While `gate` is cleared, turns wait before their token number `gate_at`: a test holds a
        # turn in flight for as long as it needs, whatever the machine's speed. (A threading
        # Event: live servers run the engine on another thread's event loop.)
        self.gate = threading.Event()
        self.gate.set()
        self.gate_at = 0
        self.cache: dict[str, list[int]] = {}
        self.pinned: dict[str, int] = {}  # thread -> len(history) to roll back to
        self.pending: dict[str, list[int]] = {}  # thread -> KV kept if the turn commits
        self.commits = 0
        self.rollbacks = 0

    async def generate(
        self,
        thread_key: str,
        history_ids: Sequence[int],
        new_ids: Sequence[int],
        params: SamplingParams,
        *,
        first_turn: bool,
        share_scope: str | None = None,
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        if thread_key in self.pinned:
            raise RuntimeError(f"thread {thread_key} is busy")
        prompt = [*history_ids, *new_ids]
        held = self.cache.get(thread_key)
        cached = 0
        if held is not None:
            while cached < min(len(held), len(prompt) - 1) and held[cached] == prompt[cached]:
                cached += 1
        miss = (
            None
            if held is not None
            else (MissReason.NEW_THREAD if first_turn else MissReason.RESTARTED)
        )
        self.pinned[thread_key] = len(history_ids)
        finished = False
        try:
            text = self.reply if self.reply is not None else f"reply to {len(prompt)} tokens"
            reply = list(text.encode())
            generated: list[int] = []
            for token_id in [*reply, self.end_id]:
                if len(generated) == params.max_tokens:
                    break
                while len(generated) >= self.gate_at and not self.gate.is_set():
                    await asyncio.sleep(0.005)
                if self.fail_after_tokens is not None and len(generated) == self.fail_after_tokens:
                    raise RuntimeError("injected failure")
                await asyncio.sleep(self.delay_s)
                generated.append(token_id)
                yield TokenEvent(token_id, self.tokenizer.decode([token_id]))
            reason = "stop" if generated and generated[-1] == self.end_id else "length"
            self.pending[thread_key] = prompt + generated[:-1]
            finished = True
            yield FinishEvent(
                token_ids=generated,
                text=self.tokenizer.decode(generated),
                finish_reason=reason,
                counts=TurnCounts(
                    prompt_tokens=len(prompt),
                    cached_tokens=cached,
                    computed_tokens=len(prompt) - cached,
                    generated_tokens=len(generated),
                    miss_reason=miss,
                ),
            )
        finally:
            if not finished:
                self.rollback_turn(thread_key)

    def commit_turn(self, thread_key: str, *, num_log_tokens: int | None = None) -> None:
        self.pinned.pop(thread_key)
        self.cache[thread_key] = self.pending.pop(thread_key)
        self.commits += 1

    def rollback_turn(self, thread_key: str) -> None:
        keep = self.pinned.pop(thread_key)
        self.pending.pop(thread_key, None)
        if thread_key in self.cache:
            self.cache[thread_key] = self.cache[thread_key][:keep]
        self.rollbacks += 1

    def forget_thread(self, thread_key: str) -> None:
        self.cache.pop(thread_key, None)

    async def fork_thread(self, parent_key: str, child_key: str, token_ids: list[int]) -> int:
        held = self.cache.get(parent_key, [])
        n = 0
        while n < min(len(held), len(token_ids)) and held[n] == token_ids[n]:
            n += 1
        if n:
            self.cache[child_key] = list(token_ids[:n])
        return n

    async def rewind_thread(self, thread_key: str, token_ids: list[int]) -> int:
        if thread_key in self.pinned:
            raise RuntimeError(f"thread {thread_key} is busy")
        held = self.cache.get(thread_key)
        if held is None:
            return 0
        n = 0
        while n < min(len(held), len(token_ids)) and held[n] == token_ids[n]:
            n += 1
        self.cache[thread_key] = held[:n]
        return n

    def shutdown(self) -> None:
        self.cache.clear()

    def thread_state(self, thread_key: str) -> FakeThreadState:
        held = self.cache.get(thread_key)
        return FakeThreadState(resident=held is not None, cached_tokens=len(held or []))


def fake_runtime(engine: FakeEngine, max_context_tokens: int = 2048) -> ModelRuntime:
    return ModelRuntime(
        name="fake-engine",
        engine=engine,
        chat_format=engine.chat_format,
        max_context_tokens=max_context_tokens,
    )
