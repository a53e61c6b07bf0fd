"""Triton paged attention: causal, grouped-query attention of a flat batch over the paged KV pool.

Same contract as `kernels/paged_attention_ref.py` (read its docstring first):

    q:             [T, Hq, D]       new query tokens of B sequences, one after another
    k/v_cache:     [N, bs, Hkv, D]  one layer of the pool, contiguous
    block_tables:  [B, M] int32     pool block ids of each sequence
    cu_seqlens_q:  [B + 1] int32    sequence b owns q[cu_seqlens_q[b] : cu_seqlens_q[b + 1]]
    seq_lens:      [B] int32        KV length of each sequence after this step

FlashAttention-style online softmax (base 2, float32 accumulators). One program owns a tile of
BLOCK_M rows for one KV head. A row is (query token, query head of that KV head's group), so the
GROUP query heads that share a KV head are packed into one tile and every K/V block is loaded once
per group, not once per query head. A decode step (one token per sequence) is one tile per
sequence and KV head:

    tile rows (GROUP = 4, BLOCK_M = 16, so BLOCK_Q = 4 query tokens):
      row:    0  1  2  3 | 4  5  6  7 | 8 ... | 12 13 14 15
      token:  t  t  t  t |t+1 ...     |  t+2  |  t+3
      head:  h0 h1 h2 h3 |h0 h1 h2 h3 | ...   |  h0 h1 h2 h3      (h0 = kv_head * GROUP)

How a program finds its sequence without a host sync: sequence b owns the tile ids
[cu_seqlens_q[b] // BLOCK_Q + b, cu_seqlens_q[b + 1] // BLOCK_Q + b + 1). That range holds at least
ceil(q_len / BLOCK_Q) ids, so T // BLOCK_Q + B ids cover the batch; a program binary-searches
cu_seqlens_q for its sequence and exits if its tile starts past the sequence's queries. When every
sequence fits in one tile (max_seqlen_q <= BLOCK_Q, e.g. decode), the tile id is the sequence.

Keys are walked in tiles of BLOCK_N positions from 0 to the causal limit of the tile's last query;
each key position p is found through its pool block, block_tables[b, p // bs], so BLOCK_N does not
depend on the pool's block size. Masks: keys past a row's own position (bottom-right-aligned
causal, which also stops at seq_len), rows past the sequence's queries, head dims past D.

Few long sequences leave most of the GPU idle (decode of 2 threads is 2 * Hkv programs), so the
key range can be split over several programs (flash-decoding, grid axis 2): each writes its partial
output and log-sum-exp to float32 scratch, and `_combine_splits_kernel` merges them. The split
count is a grid size, not a compile-time constant, so a growing context does not recompile.
Arguments that change every step (batch size, block-table width) are not specialized either.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels import variants
from kernels._checks import (
    device_guard,
    require_dtype,
    require_kv_pool,
    require_launchable,
    require_ndim,
    require_same_device,
    require_unit_last_stride,
)

_LOG2_E = math.log2(math.e)
# Split the key range only while the grid is smaller than this many programs per SM, and keep at
# least this many keys in each split: below that, the merge costs more than the parallelism gains.
_TARGET_PROGRAMS_PER_SM = 2
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 32
INTERPRETER_ARCH = 90  # the tiles the interpreter runs; tests set 80 to run the sm_80 ones


@triton.jit
def _find_seq(cu_seqlens_q_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The largest b with cu_seqlens_q[b] // BLOCK_Q + b <= tile (strictly increasing in b)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["num_seqs", "kv_split_len", "stride_bt"])
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    split_out_ptr,  # [T, Hq, num_splits, D] float32, used when SPLIT_KV
    split_lse_ptr,  # [T, Hq, num_splits] float32, base-2 log-sum-exp of each split
    qk_scale,  # softmax scale * log2(e): the softmax runs in base 2
    num_seqs,
    kv_split_len,  # keys per split, a multiple of BLOCK_N; 0: each sequence's keys cut evenly
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SPLIT_KV: tl.constexpr,
    ONE_TILE_PER_SEQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    if ONE_TILE_PER_SEQ:
        seq = tile
        q_tile_start = 0
    else:
        seq = _find_seq(cu_seqlens_q_ptr, tile, num_seqs, BLOCK_Q)
        first_tile = tl.load(cu_seqlens_q_ptr + seq) // BLOCK_Q + seq
        q_tile_start = (tile - first_tile) * BLOCK_Q
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if q_tile_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    q_idx = q_tile_start + offs_m // GROUP  # query index within the sequence
    head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = context_len + q_idx  # absolute position: sees keys 0..q_pos
    offs_d = tl.arange(0, BLOCK_D)
    # A mask that varies along the contiguous dim stops vectorized loads: apply it only when
    # head_dim is not a power of two (>= 16).
    d_valid = (offs_d < HEAD_DIM) if BLOCK_D != HEAD_DIM else tl.full([BLOCK_D], 1, tl.int1)
    token = (q_start + q_idx).to(tl.int64)

    q_mask = row_valid[:, None] & d_valid[None, :]
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=q_mask,
        other=0.0,
    )

    # Keys the tile's last query can see; rows past q_len see the same range (their output is
    # dropped), so every row sees key 0 and no row's softmax is empty.
    kv_end = context_len + tl.minimum(q_tile_start + BLOCK_Q, q_len)
    if not SPLIT_KV:
        kv_start = 0
        kv_stop = kv_end
    else:
        split_len = kv_split_len
        if split_len == 0:  # one launch for any length (a CUDA graph): cut this tile's own keys
            split_len = tl.cdiv(tl.cdiv(kv_end, tl.num_programs(2)), BLOCK_N) * BLOCK_N
        kv_start = split * split_len
        kv_stop = tl.minimum(kv_end, kv_start + split_len)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    cache_head = kv_head * stride_ch

    for start_n in range(kv_start, kv_stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < kv_stop
        block_ids = tl.load(block_table + offs_n // BLOCK_SIZE, mask=n_valid, other=0)
        kv_offs = (
            block_ids.to(tl.int64) * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs + cache_head
        )

        k = tl.load(
            k_cache_ptr + kv_offs[None, :] + offs_d[:, None],
            mask=n_valid[None, :] & d_valid[:, None],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = n_valid[None, :] & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no key yet (possible inside a split) keeps m = -inf; shift by 0
        # instead so exp2 gives 0 rather than NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)

        v = tl.load(
            v_cache_ptr + kv_offs[:, None] + offs_d[None, :],
            mask=n_valid[:, None] & d_valid[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if not SPLIT_KV:
        tl.store(
            out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=q_mask,
        )
    else:
        num_heads = tl.num_programs(1) * GROUP
        num_splits = tl.num_programs(2)
        row = (token * num_heads + head) * num_splits + split  # index into [T, Hq, num_splits]
        tl.store(split_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=q_mask)
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(split_lse_ptr + row, lse, mask=row_valid)


@triton.jit(do_not_specialize=["num_splits"])
def _combine_splits_kernel(
    out_ptr,
    split_out_ptr,
    split_lse_ptr,
    num_splits,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """out[t, h] = sum_s w_s * o_s / sum_s w_s with w_s = 2^lse_s: the softmax over all splits."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = (token * tl.num_programs(1) + head) * num_splits
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_valid = offs_s < num_splits
    d_valid = offs_d < HEAD_DIM

    lse = tl.load(split_lse_ptr + row + offs_s, mask=s_valid, other=float("-inf"))
    # Split 0 always holds key 0, so the max is finite; empty splits get weight 0.
    weight = tl.exp2(lse - tl.max(lse, axis=0))
    o = tl.load(
        split_out_ptr + (row + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
        mask=s_valid[:, None] & d_valid[None, :],
        other=0.0,
    )
    out = tl.sum(o * weight[:, None], axis=0) / tl.sum(weight, axis=0)
    tl.store(
        out_ptr + token * stride_ot + head * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=d_valid,
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    num_kv_splits: int | None = None,
    split_each_seq: bool = False,
) -> torch.Tensor:
    """Causal paged attention of q over the pool; returns a new contiguous [T, Hq, D] tensor.

    max_seqlen_q / max_seqlen_k: the largest query / KV length in the batch, known on the host
    by the caller; they pick the tiling. They must not be smaller than the truth (a tile would
    skip queries); None reads them from the tensors at the cost of a device sync.
    num_kv_splits: how many programs share one tile's key range; None chooses from the grid
    size and the device (1 off CUDA).
    split_each_seq: the kernel cuts each sequence's own keys into the splits, rather than every
    sequence's into max_seqlen_k's pieces: the launch then serves any length up to max_seqlen_k
    (a step recorded once as a CUDA graph and replayed as contexts grow).
    Rows of q not covered by cu_seqlens_q are left uninitialized, as in the reference.
    """
    _check_paged_attention_args(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out

    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    is_fp32 = q.dtype == torch.float32
    arch = device_arch(q.device)
    block_m, block_q, block_n = _choose_tiles(group, head_dim, max_seqlen_q, is_fp32, arch)
    one_tile_per_seq = max_seqlen_q <= block_q
    num_tiles = num_seqs if one_tile_per_seq else num_tokens // block_q + num_seqs

    if num_kv_splits is None:
        num_kv_splits = _choose_num_splits(q.device, num_tiles * num_kv_heads, max_seqlen_k)
    if num_kv_splits < 1:
        raise ValueError(f"num_kv_splits must be at least 1, got {num_kv_splits}")
    kv_split_len = 0
    split_out = split_lse = out  # not read without splits; any tensor fills the pointer slots
    if num_kv_splits > 1 and not split_each_seq:
        if max_seqlen_k is None:
            max_seqlen_k = int(seq_lens.max())
        kv_split_len = triton.cdiv(triton.cdiv(max(max_seqlen_k, 1), num_kv_splits), block_n)
        kv_split_len *= block_n
        # Rounding up to whole key tiles can leave trailing splits empty: drop them.
        num_kv_splits = triton.cdiv(max(max_seqlen_k, 1), kv_split_len)
    if num_kv_splits > 1:
        split_out = torch.empty(
            (num_tokens, num_heads, num_kv_splits, head_dim), dtype=torch.float32, device=q.device
        )
        split_lse = torch.empty(
            (num_tokens, num_heads, num_kv_splits), dtype=torch.float32, device=q.device
        )

    variant = _attention_variant(
        group,
        head_dim,
        q.dtype,
        k_cache.shape[1],
        (block_m, block_q, block_n),
        split_kv=num_kv_splits > 1,
        one_tile_per_seq=one_tile_per_seq,
        arch=arch,
    )
    variants.record(variant)
    with device_guard(q):
        _paged_attention_kernel[(num_tiles, num_kv_heads, num_kv_splits)](
            q,
            k_cache,
            v_cache,
            out,
            block_tables,
            cu_seqlens_q,
            seq_lens,
            split_out,
            split_lse,
            scale * _LOG2_E,
            num_seqs,
            kv_split_len,
            q.stride(0),
            q.stride(1),
            out.stride(0),
            out.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            block_tables.stride(0),
            **variant.constants,
            num_warps=variant.num_warps,
            num_stages=variant.num_stages,
        )
        if num_kv_splits > 1:
            combine = _combine_variant(head_dim, num_kv_splits)
            variants.record(combine)
            _combine_splits_kernel[(num_tokens, num_heads)](
                out,
                split_out,
                split_lse,
                num_kv_splits,
                out.stride(0),
                out.stride(1),
                **combine.constants,
                num_warps=combine.num_warps,
                num_stages=combine.num_stages,
            )
    return out


def _choose_tiles(
    group: int, head_dim: int, max_seqlen_q: int, is_fp32: bool, arch: int
) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_Q query tokens per tile, BLOCK_N keys per step) for a GPU of compute
    capability `arch` (80 for sm_80, 90 for sm_90; `device_arch`).

    Picked from the sm_80/sm_90 compiles (registers, spills: tests/kernels/test_aot_compile.py);
    see bench/gpu_check.py for timings.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    # tl.dot needs at least 16 rows; a group wider than that takes a tile of its own.
    min_rows = max(16, triton.next_power_of_2(group))
    if is_fp32:
        # The exact fp32 dot runs on FMA units and spills with bigger tiles: fp32 is the
        # correctness path, not the fast one.
        block_m = min_rows
        block_n = 64 if block_d <= 128 else 16
    elif max_seqlen_q * group <= min_rows:
        block_m = min_rows  # decode: the smallest tile that holds each sequence's rows
        block_n = 64 if block_d <= 128 else 32
    else:
        block_m = max(64 if block_d <= 128 else 32, min_rows)  # 64 rows: one wgmma tile
        block_n = 64 if block_d <= 128 else 32
        if arch < 90 and block_d == 128:
            # No wgmma before sm_90: mma.sync keeps q, the scores and the accumulator in
            # registers, and 64 x 64 x 128 spills at 255 (2-17 local stores). 32 keys a step
            # keep the 64 rows (each K/V tile still serves them all) in 184-237 registers.
            block_n = 32
    return block_m, block_m // group, block_n


def _attention_variant(
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    block_size: int,
    tiles: tuple[int, int, int],
    *,
    split_kv: bool,
    one_tile_per_seq: bool,
    arch: int,
) -> variants.Variant:
    """The compiled variant of `_paged_attention_kernel` one launch asks for."""
    block_m, block_q, block_n = tiles
    is_fp32 = dtype == torch.float32
    block_d = max(16, triton.next_power_of_2(head_dim))
    num_stages = 2 if is_fp32 else 3
    if arch >= 90 and split_kv and block_m == 16 and block_d == 64 and not is_fp32:
        # The split decode tile at 3 stages: ptxas (with Triton's --regAllocOptLevel=2) spills
        # a 64-bit address of the split epilogue at 72 registers (12 bytes of spill stores).
        # 2 stages: 66 registers, none; a split walks few key tiles, so the third buys little.
        num_stages = 2
    constexprs = {
        "GROUP": group,
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d,
        "BLOCK_M": block_m,
        "BLOCK_Q": block_q,
        "BLOCK_N": block_n,
        "BLOCK_SIZE": block_size,
        "SPLIT_KV": split_kv,
        "ONE_TILE_PER_SEQ": one_tile_per_seq,
        # fp32 inputs must stay fp32 in the dot: the default (tf32) loses the 1e-5 contract.
        "DOT_PRECISION": "ieee" if is_fp32 else "tf32",
    }
    return variants.Variant.of("paged_attention", constexprs, num_warps=4, num_stages=num_stages)


def _combine_variant(head_dim: int, num_kv_splits: int) -> variants.Variant:
    constexprs = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": triton.next_power_of_2(head_dim),
        "BLOCK_S": triton.next_power_of_2(num_kv_splits),
    }
    return variants.Variant.of("combine_splits", constexprs, num_warps=4, num_stages=3)


def max_kv_splits(device: torch.device, num_kv_heads: int, max_seqlen_k: int) -> int:
    """The most key splits `paged_attention` chooses on `device` for contexts up to max_seqlen_k
    (1: never splits)."""
    if device.type != "cuda":
        return 1
    target = _TARGET_PROGRAMS_PER_SM * _num_sms(device.index or 0)
    return max_kv_splits_for(target, num_kv_heads, max_seqlen_k)


def max_kv_splits_for(target_programs: int, num_kv_heads: int, max_seqlen_k: int) -> int:
    """`max_kv_splits` for a device that wants `target_programs` programs in flight."""
    if num_kv_heads >= target_programs:
        return 1
    by_length = max_seqlen_k // _MIN_KEYS_PER_SPLIT
    return max(1, min(triton.cdiv(target_programs, num_kv_heads), by_length, _MAX_SPLITS))


def paged_attention_variants(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    block_size: int,
    num_kv_splits: int = 1,
    *,
    arch: int,
) -> list[tuple[variants.Variant, int, int]]:
    """Every compiled variant the launcher can choose for this model shape on a GPU of compute
    capability `arch` (`device_arch`), with a launch that reaches it: (variant, max_seqlen_q,
    num_kv_splits). `num_kv_splits`: the most splits the device takes (`max_kv_splits`); the
    combine kernel's variants come with the split ones.

    The tiling depends on the batch only through max_seqlen_q, and only below 2 * BLOCK_M, so
    query lengths up to 256 reach every tile."""
    group = num_heads // num_kv_heads
    is_fp32 = dtype == torch.float32
    found: dict[variants.Variant, tuple[variants.Variant, int, int]] = {}
    for max_seqlen_q in range(1, 257):
        tiles = _choose_tiles(group, head_dim, max_seqlen_q, is_fp32, arch)
        for splits in sorted({1, num_kv_splits}):
            variant = _attention_variant(
                group,
                head_dim,
                dtype,
                block_size,
                tiles,
                split_kv=splits > 1,
                one_tile_per_seq=max_seqlen_q <= tiles[1],
                arch=arch,
            )
            found.setdefault(variant, (variant, max_seqlen_q, splits))
    for splits in range(2, num_kv_splits + 1):
        combine = _combine_variant(head_dim, splits)
        found.setdefault(combine, (combine, 1, splits))
    return list(found.values())


def device_arch(device: torch.device) -> int:
    """The compute capability the tiles are chosen for: 80 for sm_80, 90 for sm_90. Off CUDA
    (the interpreter) it is INTERPRETER_ARCH."""
    if device.type != "cuda":
        return INTERPRETER_ARCH
    return _cuda_arch(device.index or 0)


@functools.cache
def _cuda_arch(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _choose_num_splits(device: torch.device, num_programs: int, max_seqlen_k: int | None) -> int:
    if device.type != "cuda":
        return 1  # the interpreter gains nothing from more programs
    target = _TARGET_PROGRAMS_PER_SM * _num_sms(device.index or 0)
    return _num_splits_for(target, num_programs, max_seqlen_k)


def _num_splits_for(target: int, num_programs: int, max_seqlen_k: int | None) -> int:
    if num_programs >= target:
        return 1
    if max_seqlen_k is None:
        return 1  # unknown length: not worth a sync to find out
    by_length = max_seqlen_k // _MIN_KEYS_PER_SPLIT
    return max(1, min(triton.cdiv(target, num_programs), by_length, _MAX_SPLITS))


def _check_paged_attention_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    require_ndim("q", q, 3, "[num_tokens, num_heads, head_dim]")
    require_kv_pool(k_cache, v_cache)
    if q.dtype != k_cache.dtype:
        raise ValueError(
            f"q and the KV cache must have one dtype, got {q.dtype} and {k_cache.dtype}"
        )
    require_unit_last_stride("q", q)
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if head_dim != k_cache.shape[3]:
        raise ValueError(f"q has head_dim {head_dim} but the KV cache has {k_cache.shape[3]}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"q's {num_heads} heads must be a multiple of the cache's {num_kv_heads} KV heads"
        )
    require_ndim("seq_lens", seq_lens, 1, "[num_seqs]")
    require_ndim("cu_seqlens_q", cu_seqlens_q, 1, "[num_seqs + 1]")
    require_ndim("block_tables", block_tables, 2, "[num_seqs, max_blocks_per_seq]")
    for name, tensor in (
        ("seq_lens", seq_lens),
        ("cu_seqlens_q", cu_seqlens_q),
        ("block_tables", block_tables),
    ):
        require_dtype(name, tensor, torch.int32)
        require_unit_last_stride(name, tensor)
    num_seqs = seq_lens.shape[0]
    if cu_seqlens_q.shape[0] != num_seqs + 1:
        raise ValueError(
            f"cu_seqlens_q must have num_seqs + 1 = {num_seqs + 1} entries, "
            f"got {cu_seqlens_q.shape[0]}"
        )
    if block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables must have one row per sequence ({num_seqs}), got {block_tables.shape[0]}"
        )
    device = require_same_device(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        cu_seqlens_q=cu_seqlens_q,
        seq_lens=seq_lens,
    )
    require_launchable(_paged_attention_kernel, device)
