"""One append-message is one turn: validate, lock the thread, generate, commit atomically.

    outcome = await turns.begin(account_id, thread_id, request, idempotency_key)
    if isinstance(outcome, Replayed): ...           # the stored first result, nothing ran
    try:
        async for event in outcome.events():        # TextDelta ... then one TurnDone
            ...
    finally:
        await outcome.close()                       # rolls back unless committed; unlocks

`begin` does every check that can reject the request (413, 404, 409, 400 context overflow, 429
budget or turns in flight, app/threads/quotas.py) before
anything streams, so those are plain HTTP errors. Generation writes nothing; after the engine's
FinishEvent one transaction inserts the user message, the assistant message and the ledger row
and advances the thread's counters (app/threads/turn_record.py); then the engine keeps the turn's
KV (`commit_turn`). Any
failure, or the caller going away before that transaction, rolls the engine back instead, so the
KV cache never holds tokens the database does not.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from app.billing.prices import PriceBook
from app.engine.runtime.types import FinishEvent, SamplingParams
from app.threads import schemas, store
from app.threads.errors import (
    ContextLengthExceeded,
    GenerationFailed,
    IdempotencyKeyReused,
    InvalidField,
    MessageTooLarge,
    ThreadNotFound,
)
from app.threads.ports import ModelRuntime, TurnEngine
from app.threads.quotas import AccountQuotas
from app.threads.shield import run_to_completion
from app.threads.stop_holdback import StopHoldback
from app.threads.text import reject_nul, storable
from app.threads.turn_lock import TurnLocks, session_on
from app.threads.turn_record import TurnRecorder

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY_LENGTH = 255


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class TurnDone:
    result: schemas.TurnResult


@dataclass(frozen=True)
class Replayed:
    """The first result of a request retried with the same Idempotency-Key."""

    result: schemas.TurnResult


@dataclass(frozen=True)
class TurnExtras:
    """What a caller adds to a turn's record (the OpenAI-shaped routes, app/openai/).

    reply_id      the id the assistant message gets (None: a new one), known before it exists
    on_record     awaited inside the turn's one transaction with (session, result): rows that
                  must commit with the turn or not at all
    """

    reply_id: str | None = None
    on_record: Callable[[AsyncSession, schemas.TurnResult], Awaitable[None]] | None = None


@dataclass(frozen=True)
class TurnLimits:
    max_message_bytes: int
    quotas: AccountQuotas = AccountQuotas()  # turns in flight and monthly budgets, per account


class TurnService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        runtime: ModelRuntime,
        locks: TurnLocks,
        prices: Callable[[], PriceBook],
        limits: TurnLimits,
    ) -> None:
        self._sessions = sessions
        self._runtime = runtime
        self._locks = locks
        self._limits = limits
        self._recorder = TurnRecorder(runtime.name, runtime.chat_format, prices)

    async def begin(
        self,
        account_id: str,
        thread_id: str,
        request: schemas.AppendMessageRequest,
        idempotency_key: str | None = None,
        *,
        new_ids: list[int] | None = None,
        extras: TurnExtras | None = None,
        fingerprint_scope: str | None = None,
    ) -> Turn | Replayed:
        """Check everything, take the thread's turn lock; raise or return the ready turn.

        `new_ids` replaces `chat_format.user_turn(request.content)` as the turn's new tokens
        (several messages rendered by the caller, app/openai/); `extras` adds to its record.
        `fingerprint_scope` replaces the thread id in what an Idempotency-Key is checked against
        (a retry of a call that runs on a new thread each time is still the same request).
        """
        reject_nul("content", request.content)
        for i, stop in enumerate(request.stop):
            reject_nul(f"stop[{i}]", stop)
        num_bytes = len(request.content.encode("utf-8"))
        if num_bytes > self._limits.max_message_bytes:
            raise MessageTooLarge(num_bytes, self._limits.max_message_bytes)
        limit = self._runtime.max_context_tokens
        if request.max_tokens is not None and request.max_tokens >= limit:
            raise InvalidField("max_tokens", f"must be below the model's context of {limit}")
        if idempotency_key is not None:
            _check_idempotency_key(idempotency_key)
        fingerprint = _fingerprint(fingerprint_scope or thread_id, request, new_ids)

        if (replay := await self._replay(account_id, idempotency_key, fingerprint)) is not None:
            return replay
        async with self._sessions() as session:
            if await store.get_thread(session, account_id, thread_id) is None:
                raise ThreadNotFound(thread_id)
            await self._limits.quotas.check_budget(session, account_id, datetime.now(UTC))

        stack = AsyncExitStack()
        conn = await stack.enter_async_context(self._locks.hold(thread_id))
        try:
            # Left before the thread's lock (the stack unwinds in reverse), on its connection.
            await stack.enter_async_context(self._limits.quotas.turn_slot(conn, account_id))
            # Again under the lock: the first request may have finished since the look above.
            replay = await self._replay(
                account_id, idempotency_key, fingerprint, lambda: session_on(conn)
            )
            if replay is not None:
                await stack.aclose()
                return replay
            async with session_on(conn) as session, session.begin():
                thread = await store.get_thread(session, account_id, thread_id)
                if thread is None:  # deleted meanwhile
                    raise ThreadNotFound(thread_id)
                history_ids = await store.token_log(session, thread_id)
            if new_ids is None:
                new_ids = self._runtime.chat_format.user_turn(request.content)
            params = self._sampling_params(request, len(history_ids), len(new_ids))
            return Turn(
                engine=self._runtime.engine,
                recorder=self._recorder,
                account_id=account_id,
                thread_id=thread_id,
                request=request,
                history_ids=history_ids,
                new_ids=new_ids,
                first_turn=thread.message_count <= 1,
                share_scope=self._runtime.share_scope(account_id),
                params=params,
                idempotency_key=idempotency_key,
                fingerprint=fingerprint,
                conn=conn,
                unlock=stack,
                extras=extras or TurnExtras(),
            )
        except BaseException:
            await stack.aclose()
            raise

    def _sampling_params(
        self, request: schemas.AppendMessageRequest, num_history: int, num_new: int
    ) -> SamplingParams:
        """The turn's sampling, with max_tokens checked against the context.

        An explicit max_tokens must fit entirely: history + message + max_tokens <= context.
        Without one, the reply may use the room left, up to the default max_tokens.
        """
        limit = self._runtime.max_context_tokens
        room = limit - num_history - num_new
        if request.max_tokens is not None:
            max_tokens = request.max_tokens
        else:
            max_tokens = max(1, min(self._runtime.default_max_tokens, room))
        if max_tokens > room:
            raise ContextLengthExceeded(
                thread_tokens=num_history,
                message_tokens=num_new,
                max_tokens=max_tokens,
                limit=limit,
            )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
            stop=tuple(request.stop),
        )

    async def _replay(
        self,
        account_id: str,
        key: str | None,
        fingerprint: str,
        sessions: Callable[[], AsyncSession] | None = None,
    ) -> Replayed | None:
        if key is None:
            return None
        async with (sessions or self._sessions)() as session, session.begin():
            row = await store.find_usage_by_idempotency_key(session, account_id, key)
        if row is None:
            return None
        stored = row.response or {}
        if stored.get("request_sha256") != fingerprint:
            raise IdempotencyKeyReused(key)
        return Replayed(msgspec.convert(stored["body"], schemas.TurnResult))


class Turn:
    """A turn that passed every check and holds its thread's lock; see the module docstring."""

    def __init__(
        self,
        *,
        engine: TurnEngine,
        recorder: TurnRecorder,
        account_id: str,
        thread_id: str,
        request: schemas.AppendMessageRequest,
        history_ids: list[int],
        new_ids: list[int],
        first_turn: bool,
        share_scope: str,
        params: SamplingParams,
        idempotency_key: str | None,
        fingerprint: str,
        conn: AsyncConnection,
        unlock: AsyncExitStack,
        extras: TurnExtras | None = None,
    ) -> None:
        self._engine = engine
        self._recorder = recorder
        self.account_id = account_id
        self.thread_id = thread_id
        self.request = request
        self.history_ids = history_ids
        self.new_ids = new_ids
        self.first_turn = first_turn
        self.share_scope = share_scope  # whose threads' KV blocks this turn may reuse
        self.params = params
        self.idempotency_key = idempotency_key
        self.fingerprint = fingerprint
        self.conn = conn  # holds the thread's lock; the turn's reads and write run on it
        self._unlock = unlock
        self.extras = extras or TurnExtras()
        self._finished = False  # the engine sent its FinishEvent: commit or rollback is ours
        self._settled = False  # commit_turn or rollback_turn was called
        self._events: AsyncIterator | None = None

    def events(self) -> AsyncIterator[TextDelta | TurnDone]:
        if self._events is not None:
            raise RuntimeError("a turn runs once")
        self._events = self._run()
        return self._events

    def _settle(self, engine_call, **kwargs) -> None:
        if self._settled:
            return
        self._settled = True
        try:
            engine_call(self.thread_id, **kwargs)
        except Exception:
            log.exception("engine %s failed for thread %s", engine_call.__name__, self.thread_id)

    async def close(self) -> None:
        """Stop the turn if it still runs (nothing is committed then) and release the lock.

        Shielded: the caller is often being cancelled (client gone), and a half-done close would
        leave the engine's sequence running or the thread locked.
        """
        await run_to_completion(self._close())

    async def _close(self) -> None:
        try:
            if self._events is not None:
                await self._events.aclose()
            if self._finished:
                self._settle(self._engine.rollback_turn)
        finally:
            await self._unlock.aclose()

    async def _commit(self, finish: FinishEvent) -> schemas.TurnResult:
        """The one transaction of a turn, then the engine keeps its KV; or both roll back."""
        try:
            result = await self._recorder.record(self, finish)
        except BaseException:
            self._settle(self._engine.rollback_turn)
            raise
        # The log as committed: a later turn with a longer history ran in another process.
        num_log_tokens = len(self.history_ids) + len(self.new_ids) + result.message.token_count
        self._settle(self._engine.commit_turn, num_log_tokens=num_log_tokens)
        return result

    async def _run(self) -> AsyncIterator[TextDelta | TurnDone]:
        holdback = StopHoldback(self.params.stop)
        finish: FinishEvent | None = None
        try:
            try:
                # Raises at once for a turn the engine refuses (stopped, pool too small).
                stream = self._engine.generate(
                    self.thread_id,
                    self.history_ids,
                    self.new_ids,
                    self.params,
                    first_turn=self.first_turn,
                    share_scope=self.share_scope,
                )
            except Exception as exc:
                raise GenerationFailed(str(exc) or type(exc).__name__) from exc
            try:
                async for event in stream:
                    if isinstance(event, FinishEvent):
                        finish = event
                        self._finished = True
                        break
                    if delta := holdback.push(storable(event.text)):
                        yield TextDelta(delta)
            except Exception as exc:
                log.exception("generation failed for thread %s", self.thread_id)
                raise GenerationFailed(str(exc) or type(exc).__name__) from exc
            finally:
                # A stream closed before its FinishEvent aborts and rolls back by itself.
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await run_to_completion(aclose())
            if finish is None:
                raise GenerationFailed("the engine stopped before the reply was finished")
            if rest := holdback.finish(storable(finish.text)):
                yield TextDelta(rest)
            result = await run_to_completion(self._commit(finish))
            # Unlock before the client hears `done`: a client that sends its next turn the moment
            # it reads the result must not find the thread still busy. (close() unlocks again: a
            # no-op on an exit stack already closed.)
            await run_to_completion(self._unlock.aclose())
            yield TurnDone(result)
        finally:
            if self._finished:
                self._settle(self._engine.rollback_turn)  # no-op once committed


def _fingerprint(
    thread_id: str, request: schemas.AppendMessageRequest, new_ids: list[int] | None = None
) -> str:
    """What makes two appends the same request (streaming or not is only the delivery)."""
    body = msgspec.json.encode(msgspec.structs.replace(request, stream=False))
    if new_ids is not None:
        body += b"\0" + msgspec.json.encode(new_ids)
    return hashlib.sha256(thread_id.encode() + b"\0" + body).hexdigest()


def _check_idempotency_key(key: str) -> None:
    if (
        not key
        or len(key) > MAX_IDEMPOTENCY_KEY_LENGTH
        or not key.isascii()
        or not key.isprintable()
    ):
        raise InvalidField(
            "Idempotency-Key",
            f"must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} printable ASCII characters",
        )
