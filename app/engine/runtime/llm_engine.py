"""The synchronous engine: requests in, one step at a time (schedule, run, postprocess).

A request is one turn of a thread. `add_request` pins the thread and finds its resident KV;
`step` advances every scheduled sequence by one forward pass and returns the stream events it
produced; a finished turn keeps its thread pinned with the new KV until `commit_turn` (keep it)
or `rollback_turn` (back to the committed history). `abort` cancels a turn at any point.

Single-threaded by design: the async bridge calls every mutating method from its engine thread.
`lock` is held while the bookkeeping changes (never during the forward pass), so `stats()` and
`thread_state()` may be read from another thread.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Hashable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.chat.detokenizer import Decode
from app.engine.network.compiled_step import (
    WARMUP_BUDGET_S,
    StepCache,
    cuda_graph_capture,
    decode_buckets,
    eager,
    mixed_buckets,
)
from app.engine.network.kv_offload import block_shape
from app.engine.network.kv_pool import KVPool, bytes_per_block, num_blocks_for_budget
from app.engine.network.model import CausalLM
from app.engine.network.runner import ModelRunner
from app.engine.runtime.kv_hierarchy import KVHierarchy, TierStats
from app.engine.runtime.kv_store import (
    DiskStore,
    LoadedSnapshot,
    SnapshotInvalid,
    SnapshotLayout,
    model_identity,
)
from app.engine.runtime.sampler import sample, validate_params
from app.engine.runtime.scheduler import ScheduledBatch, Scheduler
from app.engine.runtime.sequence import Sequence, SequenceStatus
from app.engine.runtime.turn_metrics import HistogramSnapshot, TurnMetrics
from app.engine.runtime.types import (
    FinishEvent,
    MissReason,
    SamplingParams,
    StreamEvent,
    TokenEvent,
)
from app.kvcache import KVCacheManager, KVCacheStats, ThreadCacheState, ThreadInFlight
from app.kvcache.tiers import Tier

LogitsHook = Callable[[list[Sequence], torch.Tensor], None]


@dataclass
class RequestOutput:
    """What one step produced for one request: events, or the error that ended it."""

    seq_id: int
    thread_key: Hashable
    events: list[StreamEvent] = field(default_factory=list)
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.error is not None or any(isinstance(e, FinishEvent) for e in self.events)


class NoFinishedTurn(RuntimeError):
    """commit_turn for a thread without a finished turn awaiting it."""


class DeviceFault(RuntimeError):
    """An error after which the device cannot be trusted (raise it, or a subclass, to inject
    one in tests; CUDA's own errors are recognised by `is_device_fault`)."""


class EngineFailed(RuntimeError):
    """The engine hit a device fault and serves no more turns; the process should restart."""


_CUDA_FAULT_MARKERS = ("CUDA error", "device-side assert", "illegal memory access", "CUBLAS_STATUS")


def is_device_fault(exc: BaseException) -> bool:
    """Whether `exc` leaves the device unusable: a CUDA error is sticky, so every later kernel
    fails too. An out-of-memory error is not one (the allocator recovers)."""
    if isinstance(exc, DeviceFault | torch.AcceleratorError):
        return not isinstance(exc, torch.OutOfMemoryError)
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _CUDA_FAULT_MARKERS)


class LLMEngine:
    def __init__(
        self,
        model: CausalLM,
        *,
        num_blocks: int | None = None,
        kv_cache_mb: float | None = None,
        block_size: int = 16,
        max_batch_tokens: int = 2048,
        max_num_seqs: int = 16,
        residency: bool = True,
        stop_token_ids: Seq[int] = (),
        decode: Decode | None = None,
        max_model_len: int | None = None,
        check_invariants: bool = False,
        on_logits: LogitsHook | None = None,
        model_name: str = "",
        attention_backend: str | None = None,
        compile_decode: bool = False,
        cuda_graphs: bool | None = None,
        compile_budget_s: float = WARMUP_BUDGET_S,
        host_cache_mb: float = 0,
        disk_cache_dir: Path | str | None = None,
        disk_cache_mb: float = 0,
        snapshot_timeout_s: float = 30.0,
    ) -> None:
        """
        Give the pool's size as num_blocks or as kv_cache_mb. `attention_backend` names one
        ("triton", "torch"; see network/attention/base.py); None takes the device's own.
        `decode(ids) -> str` produces the text (without it, events carry no text and stop strings
        are refused). `check_invariants` checks the block accounting after every step (tests).
        `on_logits(seqs, logits)` sees the logits each step samples from (tests). `model_name`
        goes into the identity that shared KV blocks are named with, with the model's shapes, the
        dtype and the block size. `compile_decode` compiles the decode step for batch sizes up to
        max_num_seqs (network/compiled_step.py); `cuda_graphs` captures it (compiled or eager) as
        CUDA graphs, and steps of short prefills too; None: on a CUDA pool with the Triton
        backend. Both for up to compile_budget_s here, at construction.

        The tiers below the pool (app/engine/runtime/kv_hierarchy.py): host_cache_mb of host
        memory, disk_cache_mb of snapshots in disk_cache_dir (0 or no folder: off). `persist`
        writes what is resident to disk within snapshot_timeout_s (shutdown).
        """
        if (num_blocks is None) == (kv_cache_mb is None):
            raise ValueError("give exactly one of num_blocks and kv_cache_mb")
        config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if num_blocks is None:
            num_blocks = num_blocks_for_budget(config, block_size, self.dtype, kv_cache_mb)
        self.config = config
        # Never past the rope tables, whatever the caller's context limit says.
        self.max_model_len = min(
            max_model_len or config.max_position_embeddings, config.max_position_embeddings
        )
        self.stop_token_ids = frozenset(stop_token_ids)
        self.decode = decode
        self.check_invariants = check_invariants
        self.on_logits = on_logits
        self.lock = threading.RLock()
        self.pool = KVPool(config, num_blocks, block_size, self.dtype, self.device)
        self.kv = KVCacheManager(
            num_blocks,
            block_size,
            residency=residency,
            identity=kv_identity(config, self.dtype, block_size, model_name),
            copy_block=self.pool.copy_block,
        )
        block_bytes = bytes_per_block(config, block_size, self.dtype)
        disk = None
        disk_blocks = int(disk_cache_mb * 2**20) // block_bytes if residency else 0
        if disk_blocks and disk_cache_dir is not None:
            layout = SnapshotLayout(
                model=model_identity(model, model_name),
                dtype=str(self.dtype),
                block_shape=block_shape(self.pool),
                block_size=block_size,
            )
            disk = DiskStore(Path(disk_cache_dir), layout)
        self.snapshot_timeout_s = snapshot_timeout_s
        self.tiers = KVHierarchy(
            self.kv,
            self.pool,
            host_blocks=int(host_cache_mb * 2**20) // block_bytes if residency else 0,
            disk=disk,
            disk_blocks=disk_blocks if disk is not None else 0,
        )
        self.runner = ModelRunner(
            model,
            self.pool.layer_caches,
            block_size,
            attention_backend=attention_backend,
            block_generations=self.kv.pool.generations,
        )
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and self.runner.attn.reads_metadata_only
        elif cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, not {self.device}")
        if compile_decode or cuda_graphs:
            steps = StepCache(
                model,
                self.pool.layer_caches,
                decode_buckets(max_num_seqs),
                compile_fn=None if compile_decode else eager,
                capture=cuda_graph_capture() if cuda_graphs else None,
                attn=self.runner.attn if cuda_graphs else None,
                max_model_len=self.max_model_len,
                mixed_buckets=mixed_buckets(max_batch_tokens, max_num_seqs) if cuda_graphs else (),
            )
            steps.warm_up(compile_budget_s)
            self.runner.step_cache = steps
        self.scheduler = Scheduler(
            self.kv, max_batch_tokens=max_batch_tokens, max_num_seqs=max_num_seqs
        )
        self._seq_ids = itertools.count()
        self._active: dict[int, Sequence] = {}  # waiting or running
        self._awaiting_commit: dict[Hashable, Sequence] = {}  # finished turns, still pinned
        self.turn_metrics = TurnMetrics()  # latency and size of committed turns
        self.last_num_scheduled = 0
        self.failure: BaseException | None = None  # the device fault that ended the engine

    @classmethod
    def from_loaded(cls, loaded: Any, **kwargs: Any) -> LLMEngine:
        """From a loaded model, duck-typed: .model, and when present .tokenizer (its
        decode(ids) makes the text), .stop_token_ids and .max_context_length."""
        tokenizer = getattr(loaded, "tokenizer", None)
        kwargs.setdefault("decode", tokenizer.decode if tokenizer is not None else None)
        kwargs.setdefault("stop_token_ids", getattr(loaded, "stop_token_ids", ()))
        kwargs.setdefault("max_model_len", getattr(loaded, "max_context_length", None))
        kwargs.setdefault("model_name", getattr(loaded, "name", ""))
        return cls(loaded.model, **kwargs)

    def warm_up(self) -> int:
        """Compile every kernel variant the engine can choose before serving (see the attention
        backend's warm_up). Returns how many variants it launched."""
        return self.runner.attn.warm_up(self.config.num_heads, self.max_model_len)

    # ---- requests --------------------------------------------------------------------------

    def validate_request(
        self, history_ids: Seq[int], new_ids: Seq[int], params: SamplingParams
    ) -> None:
        """Refuse a request that can never run, with a message naming the numbers."""
        validate_params(params)
        if params.stop and self.decode is None:
            raise ValueError("stop strings need a tokenizer to decode with; none was given")
        num_prompt = len(history_ids) + len(new_ids)
        if num_prompt == 0:
            raise ValueError("the prompt is empty")
        if num_prompt >= self.max_model_len:
            raise ValueError(
                f"the prompt has {num_prompt} tokens; the model's context is "
                f"{self.max_model_len} tokens, including at least one to generate"
            )
        if not self.kv.can_ever_hold(num_prompt):
            raise ValueError(
                f"the prompt has {num_prompt} tokens; the KV pool holds at most "
                f"{self.kv.num_blocks * self.kv.block_size}"
            )
        vocab_size = self.config.vocab_size
        for ids in (history_ids, new_ids):
            if ids and not (min(ids) >= 0 and max(ids) < vocab_size):
                raise ValueError(f"token ids must be in [0, {vocab_size})")

    def add_request(
        self,
        thread_key: Hashable,
        history_ids: Seq[int],
        new_ids: Seq[int],
        params: SamplingParams,
        *,
        first_turn: bool,
        arrival: float | None = None,
        share_scope: Hashable | None = None,
        restored: LoadedSnapshot | SnapshotInvalid | None = None,
    ) -> int:
        """Queue one turn of a thread; returns its sequence id. Raises ThreadInFlight while the
        thread's previous turn is in flight or awaiting commit/rollback.

        With a `share_scope` (the account, or one scope for all when sharing across accounts is
        allowed), the turn reuses full KV blocks that any thread of the scope computed for the
        same prefix, and offers its own; None keeps the thread's KV to itself.

        A thread whose KV is on host or disk is copied back into device blocks first. The async
        bridge reads a disk snapshot beforehand in a worker (`restored`); without it the read
        happens here."""
        self.validate_request(history_ids, new_ids, params)
        prompt = [*history_ids, *new_ids]
        with self.lock:
            if self.failure is not None:
                raise EngineFailed(f"the engine failed: {self.failure}") from self.failure
            if self.kv.is_pinned(thread_key):
                raise ThreadInFlight(f"thread {thread_key!r} already has a turn in flight")
            from_tier, refused = None, False
            if not self.kv.holds(thread_key):
                from_tier, refused = self.tiers.restore(
                    thread_key, history_ids, share_scope, loaded=restored
                )
            elif restored is not None:  # read for nothing (cannot happen through the bridge)
                self.tiers.unpin_disk(thread_key)
            lookup = self.kv.begin_turn(
                thread_key,
                prompt,
                first_turn=first_turn,
                scope=share_scope,
                num_history_tokens=len(history_ids),
            )
            miss_reason = MissReason.SNAPSHOT_INVALID if refused else lookup.miss_reason
            cache_tier = None
            if lookup.num_cached_tokens:
                cache_tier = from_tier or Tier.DEVICE
            seq = Sequence(
                next(self._seq_ids),
                thread_key,
                prompt,
                len(history_ids),
                params,
                block_table=lookup.block_table,
                num_cached_tokens=lookup.num_cached_tokens,
                miss_reason=miss_reason,
                cache_tier=None if cache_tier is None else cache_tier.value,
                decode=self.decode,
                device=self.device,
                arrival=arrival,
                num_shared_tokens=lookup.num_shared_tokens,
            )
            self._active[seq.seq_id] = seq
            self.scheduler.add(seq)
            return seq.seq_id

    def abort(self, seq_id: int) -> bool:
        """Cancel a turn, in flight or finished and awaiting commit: its thread goes back to the
        committed history and is unpinned. Returns False if there was nothing to cancel."""
        with self.lock:
            seq = self._active.pop(seq_id, None)
            if seq is not None:
                self.scheduler.remove(seq)
                self._end_sequence(seq, "abort")
                self.kv.release(seq.thread_key, keep_tokens=seq.history_len)
                return True
            for key, seq in self._awaiting_commit.items():
                if seq.seq_id == seq_id:
                    del self._awaiting_commit[key]
                    self.kv.release(key, keep_tokens=seq.history_len)
                    return True
            return False

    def abort_all(self) -> list[int]:
        """Cancel every turn (shutdown). Returns the ids of the sequences that were in flight."""
        with self.lock:
            in_flight = list(self._active)
            for seq_id in in_flight:
                self.abort(seq_id)
            for key in list(self._awaiting_commit):
                self.rollback_turn(key)
            return in_flight

    def commit_turn(self, thread_key: Hashable, *, num_log_tokens: int | None = None) -> None:
        """Keep the finished turn's KV resident; unpin the thread, now the most recently used.
        `num_log_tokens`: the thread's log length as committed (reply and its closing tokens
        included); a later turn with a longer history then knows it ran elsewhere (`stale`)."""
        with self.lock:
            seq = self._awaiting_commit.pop(thread_key, None)
            if seq is None:
                raise NoFinishedTurn(f"thread {thread_key!r} has no finished turn to commit")
            self.kv.release(thread_key, num_log_tokens=num_log_tokens)
            # Hits and misses are counted here, as the ledger counts turns: a preempted turn
            # ends a miss, whatever its first admission found.
            counts = seq.counts()
            self.kv.count_turn(counts.miss_reason, counts.cached_tokens, counts.shared_tokens)
            if counts.cache_tier is not None:
                self.tiers.count_hit(Tier(counts.cache_tier))
            self.turn_metrics.observe(
                seq.timings(),
                prompt_tokens=counts.prompt_tokens,
                generated_tokens=counts.generated_tokens,
            )

    def rollback_turn(self, thread_key: Hashable) -> bool:
        """Truncate the finished turn's thread back to its committed history and unpin it.
        Returns False (and does nothing) when no finished turn awaits."""
        with self.lock:
            seq = self._awaiting_commit.pop(thread_key, None)
            if seq is None:
                return False
            self.kv.release(thread_key, keep_tokens=seq.history_len)
            return True

    def forget_thread(self, thread_key: Hashable) -> None:
        """The thread was deleted: free its KV in every tier (blocks other threads hold stay;
        its snapshot files are deleted by the disk writer, in order)."""
        with self.lock:
            self.kv.forget(thread_key)
            self.tiers.forget(thread_key)

    def fork_thread(self, parent_key: Hashable, child_key: Hashable, token_ids: Seq[int]) -> int:
        """A new thread whose log is token_ids (a prefix of the parent's) holds the parent's
        KV of it: its full blocks shared, its partial last block copied. Nothing is computed.
        Returns the tokens the child holds."""
        with self.lock:
            return self.kv.fork(parent_key, child_key, token_ids)

    def rewind_thread(self, thread_key: Hashable, token_ids: Seq[int]) -> int:
        """The thread's log was cut back to token_ids: keep the KV of what remains (a shared
        partial block is copied first). Raises ThreadInFlight during a turn. Returns tokens held."""
        with self.lock:
            if thread_key in self._awaiting_commit:
                raise ThreadInFlight(f"thread {thread_key!r} has a turn awaiting commit")
            self.tiers.forget(thread_key)  # a copy below the device holds the longer log
            return self.kv.truncate(thread_key, token_ids)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> KVCacheStats:
        with self.lock:
            return self.kv.stats()

    def thread_state(self, thread_key: Hashable) -> ThreadCacheState:
        with self.lock:
            tier = None if self.kv.holds(thread_key) else self.tiers.where(thread_key)
            if tier is None:
                return self.kv.thread_state(thread_key)
            return ThreadCacheState(
                resident=False,
                pinned=False,
                cached_tokens=len(self.tiers.held_tokens(thread_key)),
                num_blocks=0,
                last_used=None,
                tier=tier.value,
            )

    def move_down(self, thread_key: Hashable) -> bool:
        """Evict a resident, idle thread now (to the host tier, or disk, or gone), as memory
        pressure would (tests and benchmarks). False if it is not resident or is in flight."""
        with self.lock:
            return self.kv.evict(thread_key)

    def flush_disk(self, timeout: float | None = None) -> bool:
        """Wait for the queued disk writes and deletes (tests and benchmarks)."""
        store = self.tiers.store
        return True if store is None else store.flush(timeout)

    def tier_stats(self) -> TierStats:
        with self.lock:
            return self.tiers.stats()

    def turn_histograms(self) -> dict[str, HistogramSnapshot]:
        with self.lock:
            return self.turn_metrics.snapshot()

    def begin_disk_read(self, thread_key: Hashable) -> bool:
        """If the thread's KV is only on disk, pin its snapshot for a read (`read_snapshot`, in
        any thread) and return True. The turn then goes in with add_request(restored=...)."""
        with self.lock:
            if self.kv.holds(thread_key):
                return False
            return self.tiers.pin_disk(thread_key)

    def read_snapshot(
        self, thread_key: Hashable, history_ids: Seq[int]
    ) -> LoadedSnapshot | SnapshotInvalid:
        """Read and check a pinned snapshot: file IO only, no lock held (a worker thread)."""
        return self.tiers.load_from_disk(thread_key, history_ids)

    def end_disk_read(self, thread_key: Hashable) -> None:
        """The turn that read the snapshot was cancelled before it began: unpin it."""
        with self.lock:
            self.tiers.unpin_disk(thread_key)

    def persist(self) -> bool:
        """Shutdown: cancel every turn, write every resident thread to the disk tier and wait
        for the writes (at most snapshot_timeout_s). False when some were not written."""
        with self.lock:
            self.abort_all()
            return self.tiers.persist_all(self.snapshot_timeout_s)

    # ---- the step --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run, postprocess. A failure fails the scheduled requests (rolled back); a
        device fault fails the engine: every turn is rolled back and fails, nothing runs again."""
        with self.lock:
            if self.failure is not None:
                return []
            batch = self.scheduler.schedule()
            self.last_num_scheduled = len(batch)
            if not batch.seqs:
                self._maybe_check()
                return []
            now = time.perf_counter()
            for seq in batch.seqs:
                if seq.first_scheduled is None:
                    seq.first_scheduled = now
        try:
            sample_seqs, token_ids = self._run(batch)
        except Exception as exc:  # every scheduled request gets the error
            if is_device_fault(exc):
                return self._fail_engine(exc)
            with self.lock:
                outputs = [self._fail(seq, exc) for seq in batch.seqs]
                self._maybe_check()
                return outputs
        with self.lock:
            outputs = self._postprocess(batch, sample_seqs, token_ids)
            self._maybe_check()
            return outputs

    def _run(self, batch: ScheduledBatch) -> tuple[list[Sequence], list[int]]:
        prepared = self.runner.prepare(batch)
        logits = self.runner.run(prepared)
        sample_seqs = [batch.seqs[i] for i in prepared.sample_seq_index]
        if self.on_logits is not None:
            self.on_logits(sample_seqs, logits)
        if not sample_seqs:
            return sample_seqs, []
        with torch.inference_mode():
            chosen = sample(
                logits, [s.params for s in sample_seqs], [s.generator for s in sample_seqs]
            )
        return sample_seqs, chosen.tolist()  # the step's one device -> host transfer

    def _postprocess(
        self, batch: ScheduledBatch, sample_seqs: list[Sequence], token_ids: list[int]
    ) -> list[RequestOutput]:
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_cached_tokens += num_new
            # Full blocks are named as soon as computed: concurrent turns share them at once.
            self.kv.note_progress(seq.thread_key, seq.token_ids, seq.num_cached_tokens)
        self.kv.note_computed(batch.num_tokens)
        now = time.perf_counter()
        outputs = []
        for seq, token_id in zip(sample_seqs, token_ids, strict=True):
            try:
                outputs.append(self._append_token(seq, token_id, now))
            except Exception as exc:  # e.g. the tokenizer failed on this id
                outputs.append(self._fail(seq, exc))
        return outputs

    def _append_token(self, seq: Sequence, token_id: int, now: float) -> RequestOutput:
        seq.token_ids.append(token_id)
        if seq.first_token is None:
            seq.first_token = now
        is_stop_token = token_id in self.stop_token_ids and not seq.params.ignore_eos
        text = ""
        detok = seq.detokenizer
        if detok is not None and not is_stop_token:
            text = detok.add(token_id)
        finish_reason = None
        if is_stop_token or (detok is not None and detok.stopped):
            finish_reason = "stop"
        elif (
            seq.num_generated >= seq.params.max_tokens
            or seq.num_tokens >= self.max_model_len
            # The next step would need KV for every id: more than the whole pool holds.
            or not self.kv.can_ever_hold(seq.num_tokens)
        ):
            finish_reason = "length"
        if finish_reason is not None and detok is not None:
            text += detok.flush()
        output = RequestOutput(seq.seq_id, seq.thread_key, [TokenEvent(token_id, text)])
        if finish_reason is not None:
            self.scheduler.remove(seq)
            del self._active[seq.seq_id]
            self._end_sequence(seq, finish_reason)
            self._awaiting_commit[seq.thread_key] = seq
            output.events.append(
                FinishEvent(
                    token_ids=seq.generated_ids,
                    text=detok.text if detok is not None else "",
                    finish_reason=finish_reason,
                    counts=seq.counts(),
                    timings=seq.timings(),
                )
            )
        return output

    def _end_sequence(self, seq: Sequence, reason: str) -> None:
        """Record the KV the sequence computed with its thread (the thread stays pinned)."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finished = time.perf_counter()
        self.kv.finish_turn(seq.thread_key, seq.computed_ids())

    def _fail_engine(self, exc: BaseException) -> list[RequestOutput]:
        """A device fault: stop for good. Every turn in flight rolls back and fails; finished
        turns awaiting commit roll back too (their commit then finds nothing)."""
        with self.lock:
            self.failure = exc
            error = EngineFailed(f"device fault: {exc}")
            error.__cause__ = exc
            outputs = [
                RequestOutput(seq.seq_id, seq.thread_key, error=error)
                for seq in self._active.values()
            ]
            self.abort_all()
            self._maybe_check()
            return outputs

    def _fail(self, seq: Sequence, exc: BaseException) -> RequestOutput:
        if seq.seq_id in self._active:
            self.abort(seq.seq_id)
        return RequestOutput(seq.seq_id, seq.thread_key, error=exc)

    def _maybe_check(self) -> None:
        if self.check_invariants:
            self.kv.check_integrity()
            self.tiers.check_integrity()
            bs = self.kv.block_size
            for seq in self._active.values():
                assert self.kv.is_pinned(seq.thread_key)
                assert seq.num_cached_tokens <= len(seq.block_table) * bs
                # Every block the sequence will still write into is its own and unnamed.
                for block_id in seq.block_table[seq.num_cached_tokens // bs :]:
                    assert self.kv.pool.is_private(block_id), (
                        f"{seq.thread_key!r} would write into shared block {block_id}"
                    )


def kv_identity(config: Any, dtype: torch.dtype, block_size: int, model_name: str) -> bytes:
    """What KV blocks computed by this engine are interchangeable with: the same model (name
    and shapes), dtype and block layout. Shared blocks are named with it."""
    return f"{model_name}|{config!r}|{dtype}|{block_size}".encode()
