"""The model runner: the one place where block tables and slot mappings become tensors.

Per step it builds, from plain Python lists, one tensor each for the flat batch of new tokens
(ids, positions, pool slots) and the attention metadata, runs the model over the KV pool, and
computes logits only for the rows that sample: the last token of a finished prefill and every
decode token. Block tables are not rebuilt: a persistent device table keeps a row per running
sequence and receives only the blocks each step reaches for the first time (block_table.py).

    seq A: 5 cached, 3 new      input_ids: [a5 a6 a7 | b0 b1 b2 b3 | c9]
    seq B: 0 cached, 4 new      cu_seqlens_q: [0, 3, 7, 8]   seq_lens: [8, 4, 10]
    seq C: 9 cached, 1 new      sample rows: 2 (A done), 7 (C); B's prefill goes on next step
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from app.engine.network.attention import AttentionMetadata, StepOwners, create_backend
from app.engine.network.block_table import DeviceBlockTable, extend_slots
from app.engine.network.compiled_step import StepCache
from app.engine.network.fused_decode import FusedDecode
from app.engine.network.host_memory import keep_freed_memory
from app.engine.network.model import CausalLM
from app.engine.runtime.scheduler import ScheduledBatch


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [N] rows of the flat batch whose logits are sampled
    sample_seq_index: list[int]  # for each sampled row, its sequence's index in the batch


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        *,
        attention_backend: str | None = None,
        step_cache: StepCache | None = None,
        block_generations: Sequence[int] | None = None,
    ) -> None:
        self.model = model
        # The KV manager's per-block allocation counts (BlockPool.generations): with them the
        # backend is told whose KV each sequence is and may keep copies of it across steps.
        self.block_generations = block_generations
        self.step_cache = step_cache  # compiled or captured steps (warmed up by the caller)
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = kv_caches[0][0].device
        self._is_cuda = self.device.type == "cuda"
        if not self._is_cuda:
            keep_freed_memory()  # a step's big tensors reuse freed memory, not fresh pages
            # Use every core this process may run on (torch may default to fewer).
            available = len(os.sched_getaffinity(0))
            if torch.get_num_threads() < available:
                torch.set_num_threads(available)
        # The CPU library's layout (or oneDNN's) on a float32 CPU; one weight per q/k/v and
        # gate/up elsewhere.
        model.prepack_linears()
        self.attn = create_backend(kv_caches, attention_backend)
        # Steps of decodes through every layer in one C++ call, where that applies (the CPU,
        # float32, the library built): fused_decode.py. None: every step runs the forward.
        self.fused = FusedDecode.create(model, kv_caches, self.attn)
        self.block_tables = DeviceBlockTable(self.device, self._tensor)

    def _tensor(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        if self._is_cuda:
            host = torch.tensor(values, dtype=dtype, pin_memory=True)
            return host.to(self.device, non_blocking=True)
        return torch.tensor(values, dtype=dtype)

    def prepare(self, batch: ScheduledBatch) -> PreparedBatch:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        cu_seqlens_q = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sample_seq_index: list[int] = []
        tables: list[list[int]] = []
        num_blocks: list[int] = []
        starts: list[int] = []
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            start = seq.num_cached_tokens
            end = start + num_new
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            extend_slots(slot_mapping, table, start, end, bs)
            cu_seqlens_q.append(cu_seqlens_q[-1] + num_new)
            seq_lens.append(end)
            tables.append(table)
            num_blocks.append(min(len(table), -(-end // bs)))
            starts.append(start)
            if end == seq.num_tokens:
                sample_rows.append(cu_seqlens_q[-1] - 1)
                sample_seq_index.append(i)
        block_tables = self.block_tables.build(
            [seq.seq_id for seq in batch.seqs], tables, num_blocks, starts, seq_lens
        )
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slot_mapping, torch.int64),
            block_tables=block_tables,
            cu_seqlens_q=self._tensor(cu_seqlens_q, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            max_seqlen_q=max(batch.num_new_tokens),
            max_seqlen_k=max(seq_lens),
        )
        owners = None
        if self.block_generations is not None:
            owners = StepOwners(
                thread_keys=tuple(seq.thread_key for seq in batch.seqs),
                block_tables=tables,
                block_generations=self.block_generations,
            )
        self.attn.prepare(
            meta,
            seq_ids=tuple(seq.seq_id for seq in batch.seqs),
            cu_seqlens_q=cu_seqlens_q,
            seq_lens=seq_lens,
            owners=owners,
        )
        return PreparedBatch(
            input_ids=self._tensor(input_ids, torch.int64),
            positions=self._tensor(positions, torch.int64),
            meta=meta,
            sample_rows=self._tensor(sample_rows, torch.int64),
            sample_seq_index=sample_seq_index,
        )

    @torch.inference_mode()
    def run(self, prepared: PreparedBatch) -> torch.Tensor:
        """Run the model over the batch; return the float32 logits of the sampled rows [N, V]."""
        ids, positions, meta = prepared.input_ids, prepared.positions, prepared.meta
        steps = self.step_cache
        if steps is not None and steps.can_run(
            ids.shape[0], meta.seq_lens.shape[0], meta.max_seqlen_q
        ):
            hidden = steps.run(ids, positions, meta, self.attn)
        else:
            hidden = self.fused.run(ids, positions) if self.fused is not None else None
            if hidden is None:
                hidden = self.model(ids, positions, self.kv_caches, meta, self.attn)
        self.attn.finish_step()
        return self.model.compute_logits(hidden.index_select(0, prepared.sample_rows))
