"""The engine for asyncio code: `LLMEngine` on its own thread, turns as async iterators.

    engine = AsyncLLMEngine.from_loaded(loaded, kv_cache_mb=512); engine.start()
    stream = engine.generate(key, history_ids, new_ids, params, first_turn=False)
    async for event in stream: ...              # TokenEvent ... FinishEvent
    engine.commit_turn(key)  |  engine.rollback_turn(key)
    engine.shutdown()

Every change to the engine runs on the engine thread: the asyncio side queues a command and
wakes the thread, which applies the queued commands between steps and sleeps on a condition when
there is nothing it can do (no busy loop). Events go back to the asyncio loop with
`loop.call_soon_threadsafe`, one call per request per step.

A thread whose KV is only on disk is read back first: the engine thread pins its snapshot, a
worker thread reads and checks the files (never the event loop, never the engine step), and the
turn is then submitted with the loaded rows; other threads keep decoding meanwhile. `shutdown`
writes every resident thread to disk (bounded by the engine's snapshot_timeout_s).

A thread is in flight from `generate` until `commit_turn`/`rollback_turn` (or until its stream
ends without a FinishEvent); a second `generate` meanwhile raises ThreadInFlight at once. Closing
a stream before its FinishEvent was handed out (aclose, or the consuming task cancelled while it
waits for an event) aborts the turn, which frees what it took and rolls its thread back. A stream
must be closed or read to its end: the bridge holds it until then.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from functools import partial
from typing import Any

from app.engine.runtime.kv_hierarchy import TierStats
from app.engine.runtime.kv_store import LoadedSnapshot, SnapshotInvalid
from app.engine.runtime.llm_engine import EngineFailed, LLMEngine, NoFinishedTurn, RequestOutput
from app.engine.runtime.turn_metrics import HistogramSnapshot
from app.engine.runtime.types import FinishEvent, SamplingParams, StreamEvent
from app.kvcache import KVCacheStats, ThreadCacheState, ThreadInFlight

__all__ = [
    "AsyncLLMEngine",
    "EngineClosed",
    "EngineFailed",
    "NoFinishedTurn",
    "ThreadInFlight",
    "TurnStream",
]

log = logging.getLogger(__name__)


class EngineClosed(RuntimeError):
    """The engine was shut down (or never started)."""


class TurnStream:
    """The events of one turn. Iterate it once; close it to cancel the turn."""

    def __init__(self, bridge: AsyncLLMEngine, thread_key: Hashable) -> None:
        self.thread_key = thread_key
        self.seq_id: int | None = None  # set on the engine thread once the request is queued
        self.finish: FinishEvent | None = None  # handed out: commit/rollback is the caller's
        self._bridge = bridge
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[StreamEvent | BaseException] = asyncio.Queue()
        self._done = False  # FinishEvent or error handed out, or closed

    def __aiter__(self) -> TurnStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self._cancel()
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if isinstance(item, FinishEvent):
            self._done = True
            self.finish = item
        return item

    async def aclose(self) -> None:
        self._cancel()

    def _cancel(self) -> None:
        if not self._done:
            self._done = True
            self._bridge._abort_stream(self)

    def _put(self, items: list[StreamEvent | BaseException]) -> None:
        for item in items:
            self._queue.put_nowait(item)

    def _deliver(self, items: list[StreamEvent | BaseException]) -> None:
        """From the engine thread."""
        # A closed loop raises RuntimeError: nobody will read this stream any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._put, items)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._commands: deque[Callable[[], None]] = deque()
        self._stopping = False
        self._may_step = False  # engine thread only: the last step did something
        self._lock = threading.Lock()  # guards _turns and _closed
        self._turns: dict[Hashable, TurnStream] = {}  # busy threads
        self._closed = False
        self._streams: dict[int, TurnStream] = {}  # engine thread only: seq_id -> stream
        self._reading: set[TurnStream] = set()  # engine thread only: disk reads in flight
        self._thread: threading.Thread | None = None
        # Called once, from the engine thread, after a device fault ended the engine (the
        # service asks its process to exit non-zero so a supervisor restarts it).
        self.on_fatal: Callable[[BaseException], None] | None = None
        self._io = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="kv-restore")

    @classmethod
    def from_loaded(
        cls,
        loaded: Any,
        *,
        kv_cache_mb: float | None = None,
        block_size: int = 16,
        max_batch_tokens: int = 2048,
        max_num_seqs: int = 16,
        residency: bool = True,
        **engine_kwargs: Any,
    ) -> AsyncLLMEngine:
        """From a loaded model (anything with .model, .tokenizer.decode, .stop_token_ids and
        .max_context_length, as `app.engine.loading.loader.resolve_model` returns). Give the
        pool as kv_cache_mb or as num_blocks (in engine_kwargs)."""
        engine = LLMEngine.from_loaded(
            loaded,
            kv_cache_mb=kv_cache_mb,
            block_size=block_size,
            max_batch_tokens=max_batch_tokens,
            max_num_seqs=max_num_seqs,
            residency=residency,
            **engine_kwargs,
        )
        return cls(engine)

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine was already started")
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Abort every turn in flight (rolled back; their streams raise EngineClosed), roll back
        finished turns awaiting commit, and join the engine thread. Blocks for at most one step."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    # ---- turns -------------------------------------------------------------------------------

    def generate(
        self,
        thread_key: Hashable,
        history_ids: Sequence[int],
        new_ids: Sequence[int],
        params: SamplingParams,
        *,
        first_turn: bool,
        share_scope: Hashable | None = None,
    ) -> TurnStream:
        """Start a turn; its events arrive through the returned stream (call from the loop).

        Raises at once: ThreadInFlight if the thread's previous turn is not settled, ValueError
        for a request that can never run, EngineClosed after shutdown.
        """
        arrival = time.perf_counter()
        history, new = list(history_ids), list(new_ids)
        self.engine.validate_request(history, new, params)
        with self._lock:
            if self._closed or self._thread is None:
                raise EngineClosed("the engine is not running")
            if thread_key in self._turns:
                raise ThreadInFlight(f"thread {thread_key!r} already has a turn in flight")
            stream = TurnStream(self, thread_key)
            self._turns[thread_key] = stream
        self._submit(
            partial(
                self._prepare_turn, stream, history, new, params, first_turn, arrival, share_scope
            )
        )
        return stream

    def commit_turn(self, thread_key: Hashable, *, num_log_tokens: int | None = None) -> None:
        """Keep the finished turn's KV resident and unpin the thread. A no-op after shutdown.
        `num_log_tokens`: the committed log's length (see LLMEngine.commit_turn)."""
        with self._lock:
            if self._closed:
                return
            stream = self._turns.get(thread_key)
            if stream is None or stream.finish is None:
                raise NoFinishedTurn(f"thread {thread_key!r} has no finished turn to commit")
            del self._turns[thread_key]
        self._submit(partial(self.engine.commit_turn, thread_key, num_log_tokens=num_log_tokens))

    def rollback_turn(self, thread_key: Hashable) -> bool:
        """Truncate the thread's KV to its history before the turn and unpin it; a turn still
        streaming is cancelled. Returns False when the thread has no unsettled turn."""
        with self._lock:
            if self._closed:
                return False
            stream = self._turns.get(thread_key)
            if stream is None:
                return False
            if stream.finish is not None:
                del self._turns[thread_key]
                self._submit(partial(self.engine.rollback_turn, thread_key))
                return True
        stream._cancel()
        return True

    def forget_thread(self, thread_key: Hashable) -> None:
        """The thread was deleted: free its resident KV."""
        with self._lock:
            if self._closed:
                return
            if thread_key in self._turns:
                raise ThreadInFlight(f"thread {thread_key!r} has a turn in flight")
        self._submit(partial(self.engine.forget_thread, thread_key))

    async def fork_thread(
        self, parent_key: Hashable, child_key: Hashable, token_ids: Sequence[int]
    ) -> int:
        """Give a new thread the parent's KV of token_ids (shared blocks; see
        LLMEngine.fork_thread). Returns the tokens the child holds."""
        return await self._call(
            partial(self.engine.fork_thread, parent_key, child_key, list(token_ids))
        )

    async def rewind_thread(self, thread_key: Hashable, token_ids: Sequence[int]) -> int:
        """Cut the thread's KV back to token_ids; ThreadInFlight while it has a turn."""
        with self._lock:
            if thread_key in self._turns:
                raise ThreadInFlight(f"thread {thread_key!r} has a turn in flight")
        return await self._call(partial(self.engine.rewind_thread, thread_key, list(token_ids)))

    def stats(self) -> KVCacheStats:
        return self.engine.stats()

    def tier_stats(self) -> TierStats:
        return self.engine.tier_stats()

    def turn_histograms(self) -> dict[str, HistogramSnapshot]:
        return self.engine.turn_histograms()

    async def move_down(self, thread_key: Hashable) -> bool:
        """Evict an idle resident thread down one tier now (LLMEngine.move_down), on the
        engine thread."""
        return await self._call(partial(self.engine.move_down, thread_key))

    def thread_state(self, thread_key: Hashable) -> ThreadCacheState:
        return self.engine.thread_state(thread_key)

    # ---- the engine thread -----------------------------------------------------------------

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread, between steps, and await its result."""
        with self._lock:
            if self._closed or self._thread is None:
                raise EngineClosed("the engine is not running")
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def command() -> None:
            try:
                done.set_result(fn())
            except Exception as exc:
                done.set_exception(exc)

        self._submit(command)
        return await asyncio.wrap_future(done)

    def _submit(self, command: Callable[[], None]) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._commands or self._stopping or self._may_step):
                    self._cond.wait()
                commands = list(self._commands)
                self._commands.clear()
                stopping = self._stopping
            for command in commands:
                try:
                    command()
                except Exception:
                    log.exception("engine command failed")
            if stopping:
                self._stop_on_engine_thread()
                return
            if commands:
                self._may_step = self.engine.has_unfinished()
            if not self._may_step:
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bookkeeping failure: end every turn rather than hang
                log.exception("engine step failed")
                outputs = self._fail_all(exc)
            self._deliver(outputs)
            if self.engine.failure is not None:
                self._stop_after_fault(self.engine.failure)
                return
            # Nothing scheduled means only a command (a commit freeing blocks) can help.
            self._may_step = self.engine.has_unfinished() and self.engine.last_num_scheduled > 0

    def _prepare_turn(self, stream: TurnStream, history: list[int], *args: Any) -> None:
        """On the engine thread: a thread only on disk is read by a worker first."""
        if stream._done:  # closed before it began
            return
        if not self.engine.begin_disk_read(stream.thread_key):
            self._start_turn(stream, history, *args)
            return
        self._reading.add(stream)

        def read() -> None:
            loaded = self.engine.read_snapshot(stream.thread_key, history)
            self._submit(partial(self._start_turn, stream, history, *args, restored=loaded))

        self._io.submit(read)

    def _start_turn(
        self,
        stream: TurnStream,
        history: list[int],
        new: list[int],
        params: SamplingParams,
        first_turn: bool,
        arrival: float,
        share_scope: Hashable | None = None,
        restored: LoadedSnapshot | SnapshotInvalid | None = None,
    ) -> None:
        self._reading.discard(stream)
        if stream._done:  # closed before it began: nothing to abort, nothing to start
            if restored is not None:
                self.engine.end_disk_read(stream.thread_key)
            return
        try:
            seq_id = self.engine.add_request(
                stream.thread_key,
                history,
                new,
                params,
                first_turn=first_turn,
                arrival=arrival,
                share_scope=share_scope,
                restored=restored,
            )
        except Exception as exc:
            self._release(stream)
            stream._deliver([exc])
            return
        stream.seq_id = seq_id
        self._streams[seq_id] = stream

    def _abort_stream(self, stream: TurnStream) -> None:
        """From the loop (or a finalizer): the stream was closed before its FinishEvent."""
        self._release(stream)
        with self._lock:
            if self._closed:
                return
        self._submit(partial(self._abort_on_engine_thread, stream))

    def _abort_on_engine_thread(self, stream: TurnStream) -> None:
        if stream.seq_id is not None:
            self._streams.pop(stream.seq_id, None)
            self.engine.abort(stream.seq_id)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.seq_id)
            if stream is None:
                continue
            items: list[StreamEvent | BaseException] = list(out.events)
            if out.error is not None:
                self._release(stream)  # the engine already rolled the thread back
                items.append(out.error)
            if out.finished:
                del self._streams[out.seq_id]
            stream._deliver(items)

    def _fail_all(self, exc: BaseException) -> list[RequestOutput]:
        outputs = []
        for seq_id, stream in list(self._streams.items()):
            self.engine.abort(seq_id)
            outputs.append(RequestOutput(seq_id, stream.thread_key, error=exc))
        return outputs

    @property
    def failure(self) -> BaseException | None:
        """The device fault that ended the engine, or None."""
        return self.engine.failure

    def _stop_after_fault(self, exc: BaseException) -> None:
        log.critical("device fault, the engine stops: %s", exc)
        with self._lock:
            self._closed = True
        for stream in self._streams.values():
            self._release(stream)
            stream._deliver([EngineFailed(f"device fault: {exc}")])
        self._streams.clear()
        with self._lock:
            self._turns.clear()
        if self.on_fatal is not None:
            try:
                self.on_fatal(exc)
            except Exception:
                log.exception("on_fatal failed")

    def _stop_on_engine_thread(self) -> None:
        self.engine.abort_all()
        for stream in [*self._streams.values(), *self._reading]:
            self._release(stream)
            stream._deliver([EngineClosed("the engine shut down during the turn")])
        self._streams.clear()
        self._reading.clear()
        self._io.shutdown(wait=False, cancel_futures=True)
        try:
            self.engine.persist()  # resident threads to disk, bounded in time
        except Exception:
            log.exception("writing the KV snapshots at shutdown failed")
        with self._lock:
            self._turns.clear()

    def _release(self, stream: TurnStream) -> None:
        with self._lock:
            if self._turns.get(stream.thread_key) is stream:
                del self._turns[stream.thread_key]
