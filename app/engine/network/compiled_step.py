"""Steps at fixed shapes, padded up to them: compiled (torch.compile) on the CPU, captured as
CUDA graphs on a GPU, one mechanism for both.

A step of decodes is one token per sequence, so its shapes are those of the batch size alone,
except attention's keys, which grow every step. The cache builds the forward pass once per
shape, with attention as one opaque op, `kvthreads::paged_attention`, that calls the step's
backend eagerly:

- compiled (`compile_fn`, default inductor): decode steps per batch-size bucket; norms, rope,
  SiLU and residual adds fused around the linears.
- captured (`capture`, CUDA graphs): the forward pass (compiled or eager) recorded once over
  static input buffers and replayed: one launch for the whole step, where a small step is bound
  by launching ~25 kernels per layer from Python rather than by the GPU. Decode buckets, and
  `mixed_buckets` of (tokens, sequences) for steps of short prefills beside decodes: a new
  message on a long cached history is such a step, and its time to first token is then the
  GPU's. The step's inputs are copied into the buffers; attention reads a block table of
  max_model_len's width, and splits each sequence's own keys (`AttentionMetadata.replayed`).
  Only a backend that reads the step's metadata as it is (`reads_metadata_only`, the Triton
  one) can be captured.

Longer prefills stay eager (they are bound by the GPU's arithmetic), and so does a step past the
largest shape or one that did not build in the warm-up's time.

    steps = StepCache(model, kv_caches, buckets=(1, 2, 4, 8))                    # CPU: inductor
    steps = StepCache(model, kv_caches, capture=cuda_graph_capture(), attn=runner.attn,
                      max_model_len=8192, compile_fn=eager,                      # CUDA graphs
                      mixed_buckets=[(64, 1), (64, 4), (256, 4)])
    steps.warm_up(budget_s=120)                          # build the shapes, smallest first
    if steps.can_run(num_tokens, num_seqs, max_seqlen_q):   # a step within a built shape
        hidden = steps.run(input_ids, positions, meta, attn)   # [T, hidden]

    real rows  0 .. T-1 | padding T .. shape-1  (slot -1: computed, never stored, cut off the
                                                 output; _StaticInputs draws the padding)

The linears enter the graph as `kvthreads::packed_linear` (packed_linear.py); whether every
group is still packed is checked once a step in `can_run` (a weight replaced since: eager). A
captured step also holds the pool's addresses: a pool whose tensors changed since is captured
again at the next step (`can_run`). Compiled artifacts persist in inductor's cache folder
(TORCHINDUCTOR_CACHE_DIR), so a restart recompiles from the cache in a fraction of the first time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from app.engine.network.attention import AttentionBackend, AttentionMetadata

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)
WARMUP_BUDGET_S = 300.0  # build buckets, smallest first, until this much time has gone

# Captured mixed steps: up to this many tokens (short prefills beside decodes); longer ones are
# bound by the GPU's arithmetic, where one launch per kernel costs little.
MIXED_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512)


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes to build for an engine of max_num_seqs: the defaults below it, then itself."""
    return [b for b in DEFAULT_BUCKETS if b < max_num_seqs] + [max_num_seqs]


def mixed_buckets(max_batch_tokens: int, max_num_seqs: int) -> list[tuple[int, int]]:
    """(tokens, sequences) shapes to capture for an engine's step limits."""
    return [
        (tokens, seqs)
        for tokens in MIXED_TOKEN_BUCKETS
        if tokens <= max_batch_tokens
        for seqs in decode_buckets(max_num_seqs)
        if seqs <= tokens
    ]


# capture(fn) -> (replay, out): run fn once recorded; replay() redoes its work into `out`.
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], object], torch.Tensor]]


@dataclass
class _StepContext:
    attn: AttentionBackend | None  # None: a warm-up pass, attention gives zeros
    meta: AttentionMetadata | None
    kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]]
    num_rows: int  # rows the backend serves; the rest of the bucket is padding, given zeros


_current: _StepContext | None = None


@contextmanager
def _step_context(ctx: _StepContext) -> Iterator[None]:
    global _current
    if _current is not None:
        raise RuntimeError("a compiled or captured step is already running")
    _current = ctx
    try:
        yield
    finally:
        _current = None


def routes_attention() -> bool:
    """Whether the layers call kvthreads::paged_attention: while compiling (dynamo reads no
    global then, so no guard on it) or inside a step run through the cache (a capture)."""
    return torch.compiler.is_compiling() or _current is not None


@torch.library.custom_op("kvthreads::paged_attention", mutates_args=())
def paged_attention_op(
    q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scale: float
) -> torch.Tensor:
    """Store the step's keys/values of `layer` in the pool and attend over it, through the
    running step's backend; the padding rows get zeros. q [T, Hq, D], key/value [T, Hkv, D]."""
    ctx = _current
    if ctx is None:
        raise RuntimeError(
            "kvthreads::paged_attention runs only inside a compiled or captured step"
        )
    if ctx.attn is None:
        return torch.zeros_like(q)
    n = ctx.num_rows
    k_cache, v_cache = ctx.kv_caches[layer]
    if n == q.shape[0]:  # a captured step: its padding rows are the metadata's own
        ctx.attn.store_kv(key, value, k_cache, v_cache, ctx.meta)
        return ctx.attn.forward(q, k_cache, v_cache, ctx.meta, scale, layer)
    out = torch.zeros_like(q)
    ctx.attn.store_kv(key[:n], value[:n], k_cache, v_cache, ctx.meta)
    out[:n] = ctx.attn.forward(q[:n], k_cache, v_cache, ctx.meta, scale, layer)
    return out


@paged_attention_op.register_fake
def _(
    q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scale: float
) -> torch.Tensor:
    return torch.empty_like(q)


class StepCache:
    """The model's forward pass per step shape, (tokens, sequences): built (compiled and/or
    captured), or None (eager). Decode shapes are (B, B), one per bucket of `buckets`; with a
    capture, `mixed_buckets` add (T, S) shapes for steps of prefill chunks and decodes together,
    up to T tokens of up to S sequences (a short turn on a long cached history is one)."""

    def __init__(
        self,
        model: torch.nn.Module,  # a CausalLM (model.py imports this module for its op)
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        compile_fn: Callable[[Callable], Callable] | None = None,
        *,
        capture: Capture | None = None,
        attn: AttentionBackend | None = None,  # captured steps: the backend they replay
        max_model_len: int | None = None,  # captured steps: the longest context attended
        mixed_buckets: Sequence[tuple[int, int]] = (),  # captured steps: (tokens, sequences)
    ) -> None:
        if capture is not None:
            if attn is None or not attn.reads_metadata_only:
                raise ValueError("a captured step needs a backend that keeps no step state")
            if max_model_len is None:
                raise ValueError("a captured step needs max_model_len")
        elif mixed_buckets:
            raise ValueError("mixed steps are only captured (CUDA graphs), not compiled alone")
        self.model = model
        self.kv_caches = kv_caches
        self.decode_shapes = [(b, b) for b in sorted(set(buckets))]
        self.mixed_shapes = sorted(set(mixed_buckets))
        self.compile_fn = compile_fn or _inductor
        self.capture = capture
        self.attn = attn
        self.max_model_len = max_model_len
        self.steps: dict[tuple[int, int], Callable | None] = dict.fromkeys(
            self.decode_shapes + self.mixed_shapes
        )
        self.device = kv_caches[0][0].device
        self.num_captures = 0  # graphs recorded, first builds and rebuilds (tests)
        self._groups = model.linear_groups()
        self._pool_key = _pool_key(kv_caches)
        self._budget_s = WARMUP_BUDGET_S
        # One cache entry per shape on the same code object (and more for other models).
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 8 * len(self.steps))

    def shape_for(
        self, num_tokens: int, num_seqs: int, max_seqlen_q: int
    ) -> tuple[int, int] | None:
        """The smallest shape a step fits: a decode bucket for a step of decodes, else a mixed
        one (fewest tokens, then fewest sequences). None: larger than every one."""
        if max_seqlen_q == 1:
            return next((s for s in self.decode_shapes if s[1] >= num_seqs), None)
        fits = (s for s in self.mixed_shapes if s[0] >= num_tokens and s[1] >= num_seqs)
        return next(fits, None)

    def warm_up(
        self, budget_s: float = WARMUP_BUDGET_S, shapes: Sequence[tuple[int, int]] | None = None
    ) -> list[tuple[int, int]]:
        """Build the shapes (default: all), decodes smallest first, then the mixed ones, while
        the budget lasts (a shape started is finished); the rest stay eager. Returns the
        shapes built."""
        self._budget_s = budget_s
        start = time.perf_counter()
        forward = None
        for shape in self.steps if shapes is None else shapes:
            if time.perf_counter() - start > budget_s:
                log.info("warm-up budget spent: steps from %s on run eager", shape)
                break
            t0 = time.perf_counter()
            try:
                # One compiled function for every shape: dynamo keeps an entry per shape.
                forward = forward or self.compile_fn(self._forward)
                if self.capture is None:
                    step = _PaddedStep(forward, shape[0], self.kv_caches, self.device)
                else:
                    static = self._static_inputs(shape)
                    step = _CapturedStep(forward, static, self.attn, self.kv_caches, self.capture)
                    self.num_captures += 1
            except Exception:  # a backend that cannot build this: the shape stays eager
                log.warning("building the step of shape %s failed", shape, exc_info=1)
                continue
            self.steps[shape] = step
            log.debug("step of shape %s built in %.2f s", shape, time.perf_counter() - t0)
        built = [shape for shape, step in self.steps.items() if step is not None]
        log.info("%d step shapes built in %.1f s", len(built), time.perf_counter() - start)
        return built

    def can_run(self, num_tokens: int, num_seqs: int, max_seqlen_q: int) -> bool:
        """A step within a built shape, every linear still packed or fused as it was when
        traced. Captured steps whose pool's tensors moved since are captured again first."""
        shape = self.shape_for(num_tokens, num_seqs, max_seqlen_q)
        if shape is None or self.steps[shape] is None:
            return False
        if any(group.is_stale for group in self._groups):
            return False
        if self.capture is not None and _pool_key(self.kv_caches) != self._pool_key:
            self._capture_again()
            return self.steps[shape] is not None
        return True

    def run(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        """Hidden states after the final norm, [T, hidden], through the shape's step."""
        shape = self.shape_for(input_ids.shape[0], meta.seq_lens.shape[0], meta.max_seqlen_q)
        return self.steps[shape](input_ids, positions, meta, attn)

    def _capture_again(self) -> None:
        """The graphs hold the old pool's addresses: record the shapes that were built anew."""
        log.info("the KV pool moved: capturing the steps again")
        built = [shape for shape, step in self.steps.items() if step is not None]
        self.steps = dict.fromkeys(self.steps)
        self._pool_key = _pool_key(self.kv_caches)
        self.warm_up(self._budget_s, built)

    def _static_inputs(self, shape: tuple[int, int]) -> _StaticInputs:
        block_size = self.kv_caches[0][0].shape[1]
        max_blocks = -(-self.max_model_len // block_size)
        decode = shape in self.decode_shapes
        return _StaticInputs(*shape, decode, max_blocks, block_size, self.device)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # meta and attn stay outside the graph: the layers call kvthreads::paged_attention.
        return self.model(input_ids, positions, self.kv_caches, None, None)


class _PaddedStep:
    """A bucket's forward pass, called on each step's inputs padded up to the bucket."""

    def __init__(self, forward: Callable, bucket: int, kv_caches, device: torch.device) -> None:
        self.forward = forward
        self.bucket = bucket
        self.kv_caches = kv_caches
        zeros = torch.zeros(bucket, dtype=torch.int64, device=device)
        with torch.inference_mode(), _step_context(_StepContext(None, None, [], 0)):
            forward(zeros, zeros)  # compiles; attention gives zeros, the pool is untouched

    def __call__(self, input_ids, positions, meta, attn) -> torch.Tensor:
        num_seqs = input_ids.shape[0]
        pad = self.bucket - num_seqs
        if pad:
            input_ids = F.pad(input_ids, (0, pad))
            positions = F.pad(positions, (0, pad))
        with _step_context(_StepContext(attn, meta, self.kv_caches, num_seqs)):
            hidden = self.forward(input_ids, positions)
        return hidden[:num_seqs]


class _StaticInputs:
    """One shape's step inputs at fixed addresses, as a captured graph reads them.

    tokens 0 .. n-1   the step's ids, positions and slots; then padding: slot -1 (nothing
                      stored), their rows computed and cut off
    seqs 0 .. s-1     the step's query offsets, KV lengths and block tables; then padding:
      decode shape      one query each (cu_seqlens_q stays 0, 1, 2, ...), KV length 1: it
                        attends to the first key of whatever block its table row names
      mixed shape       no query (cu_seqlens_q repeats n): the kernels pass over it
    """

    def __init__(
        self,
        num_tokens: int,
        num_seqs: int,
        decode: bool,
        max_blocks: int,
        block_size: int,
        device,
    ) -> None:
        from app.engine.network.attention.base import AttentionMetadata

        self.num_tokens, self.num_seqs, self.decode = num_tokens, num_seqs, decode
        self.input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(num_tokens, dtype=torch.int64, device=device)
        cu_seqlens_q = torch.arange(num_seqs + 1, dtype=torch.int32, device=device)
        self.meta = AttentionMetadata(
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
            block_tables=torch.zeros(num_seqs, max_blocks, dtype=torch.int32, device=device),
            cu_seqlens_q=cu_seqlens_q if decode else torch.zeros_like(cu_seqlens_q),
            seq_lens=torch.ones(num_seqs, dtype=torch.int32, device=device),
            max_seqlen_q=1 if decode else num_tokens,
            max_seqlen_k=max_blocks * block_size,
            replayed=True,  # the kernels cut each sequence's keys, whatever its length
        )

    def fill(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> None:
        num_tokens = input_ids.shape[0]
        num_seqs, width = meta.block_tables.shape
        static = self.meta
        if width > static.block_tables.shape[1]:
            raise ValueError(f"a block table of {width} blocks is past max_model_len")
        self.input_ids[:num_tokens].copy_(input_ids)
        self.positions[:num_tokens].copy_(positions)
        static.slot_mapping[:num_tokens].copy_(meta.slot_mapping)
        static.seq_lens[:num_seqs].copy_(meta.seq_lens)
        static.block_tables[:num_seqs, :width].copy_(meta.block_tables)
        # Rows a larger step filled before are padding again (or they would store over its
        # slots); a decode shape's query offsets never change.
        if num_tokens < self.num_tokens:
            static.slot_mapping[num_tokens:].fill_(-1)
        if self.decode:
            if num_seqs < self.num_seqs:
                static.seq_lens[num_seqs:].fill_(1)
        else:
            static.cu_seqlens_q[: num_seqs + 1].copy_(meta.cu_seqlens_q)
            static.cu_seqlens_q[num_seqs + 1 :].fill_(num_tokens)


class _CapturedStep:
    """A shape's forward pass recorded over its static inputs, replayed on each step's."""

    def __init__(
        self,
        forward: Callable,
        static: _StaticInputs,
        attn: AttentionBackend,
        kv_caches,
        capture: Capture,
    ) -> None:
        self.static = static
        self.attn = attn

        def record() -> torch.Tensor:
            context = _StepContext(attn, static.meta, kv_caches, static.num_tokens)
            with torch.inference_mode(), _step_context(context):
                return forward(static.input_ids, static.positions)

        self.replay, self.out = capture(record)

    def __call__(self, input_ids, positions, meta, attn) -> torch.Tensor:
        if attn is not self.attn:
            raise RuntimeError("a captured step replays the backend it was captured with")
        self.static.fill(input_ids, positions, meta)
        self.replay()
        return self.out[: input_ids.shape[0]]


def cuda_graph_capture(pool: object | None = None) -> Capture:
    """CUDA graphs sharing one memory pool (one step replays at a time). Two runs on a side
    stream first, as torch asks: lazy initialisation (cuBLAS handles, Triton's first launch,
    inductor's compile) must not happen inside the capture."""
    pool = pool if pool is not None else torch.cuda.graph_pool_handle()

    def capture(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], object], torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
        return graph.replay, out

    return capture


def rerun_capture(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], object], torch.Tensor]:
    """A stand-in for a CUDA graph on any device: "replay" runs fn again over the same static
    inputs and writes the result into the recorded output, as a graph does (tests)."""
    out = fn()
    return (lambda: out.copy_(fn())), out


def eager(fn: Callable) -> Callable:
    """compile_fn for a captured step without torch.compile: the eager forward is recorded."""
    return fn


def _pool_key(kv_caches) -> tuple[int, ...]:
    return tuple(t.data_ptr() for pair in kv_caches for t in pair)


def _inductor(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False, fullgraph=True)
