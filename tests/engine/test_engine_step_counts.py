"""What one decode step costs in host-to-device copies and tensor operators, counted exactly on
the tiny random model, so that neither creeps back up unnoticed.

A TorchDispatchMode sees every aten operator; each is charged to the phase running it: the
runner's `prepare` (lists to tensors), the attention backend (its own module, counted but only
bounded here: it is tuned on its own), the rest of the model, and the sampler. Host-to-device
copies are the calls of the two upload points, `ModelRunner._tensor` and the sampler's
`_to_device` (pinned, non-blocking copies on CUDA; plain `torch.tensor` on the CPU), and on a
device the dispatch mode also checks that no other operator copies across devices.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from engine_testing import random_ids, random_model
from torch.utils._python_dispatch import TorchDispatchMode

from app.engine.network.runner import ModelRunner
from app.engine.runtime import sampler as sampler_module
from app.engine.runtime.scheduler import ScheduledBatch
from app.engine.runtime.sequence import Sequence
from app.engine.runtime.types import SamplingParams
from kernels.cpu_linear import PackedLinear

BS = 4


class StepCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.phases = ["model"]
        self.ops: dict[str, Counter] = {}
        self.uploads: Counter = Counter()
        self.cross_device: list[str] = []
        self.host_to_device = 0  # copies from host memory to the device, in any phase
        self.library_products = 0  # linears by the CPU library (ctypes: no aten operator)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.setdefault(self.phases[-1], Counter())[str(func)] += 1
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = out
            if src.device != dst.device and self.phases[-1] != "upload":
                self.cross_device.append(f"{self.phases[-1]}: {func}")
            if src.device.type == "cpu" and dst.device.type != "cpu":
                self.host_to_device += 1
        return out

    def tagged(self, phase: str, fn):
        def wrapper(*args, **kwargs):
            self.phases.append(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.phases.pop()

        return wrapper

    def total(self, phase: str) -> int:
        return sum(self.ops.get(phase, Counter()).values())


def decode_batch(num_seqs: int, device: torch.device) -> ScheduledBatch:
    seqs = []
    for i in range(num_seqs):
        ids = random_ids((6, 7, 10, 11)[i], seed=i)  # no block boundary crossed next step
        # Two greedy, two sampled with top-k and top-p: every sampler branch runs.
        temperature, top_k, top_p = (0.0, 0, 1.0) if i % 2 == 0 else (0.8, 20, 0.9)
        params = SamplingParams(max_tokens=8, temperature=temperature, top_k=top_k, top_p=top_p)
        seq = Sequence(
            i, f"t{i}", ids, 0, params,
            block_table=[3 * i + j for j in range(3)],
            num_cached_tokens=len(ids) - 1,
            miss_reason=None, decode=None, device=device,
        )  # fmt: skip
        seqs.append(seq)
    return ScheduledBatch(seqs, [1] * num_seqs)


def count_decode_step(monkeypatch, device: torch.device) -> StepCounter:
    counter = StepCounter()
    monkeypatch.setattr(ModelRunner, "_tensor", counter.tagged("upload", ModelRunner._tensor))
    monkeypatch.setattr(
        sampler_module, "_to_device", counter.tagged("upload", sampler_module._to_device)
    )
    model = random_model().to(device)
    model.init_rope(device, torch.float32)
    config = model.config
    kv = [
        tuple(
            torch.zeros(32, BS, config.num_kv_heads, config.head_dim, device=device)
            for _ in range(2)
        )
        for _ in range(config.num_layers)
    ]
    original_product = PackedLinear.__call__

    def library_product(self, *args, **kwargs):
        counter.library_products += 1
        return original_product(self, *args, **kwargs)

    monkeypatch.setattr(PackedLinear, "__call__", library_product)
    runner = ModelRunner(model, kv, block_size=BS)
    for name in ("prepare", "store_kv", "forward", "finish_step"):
        setattr(runner.attn, name, counter.tagged("attention", getattr(runner.attn, name)))
    prepare = counter.tagged("prepare", runner.prepare)
    batch = decode_batch(4, device)

    def step():
        prepared = prepare(batch)
        logits = runner.run(prepared)
        with torch.inference_mode():
            chosen = counter.tagged("sample", sampler_module.sample)(
                logits, [s.params for s in batch.seqs], [s.generator for s in batch.seqs]
            )
        for seq in batch.seqs:
            seq.num_cached_tokens += 1
            seq.token_ids.append(0)
        return chosen

    step()  # the first step writes every block-table row
    with counter:
        counter.ops.clear()
        counter.library_products = 0
        step()  # a decode step within the sequences' last blocks
    counter.uploads = counter.ops.pop("upload", Counter())
    return counter


def upload_calls(counter: StepCounter) -> int:
    return counter.uploads["aten.lift_fresh.default"]  # one torch.tensor(list) per upload


def check_counts(counter: StepCounter) -> None:
    # 8 host-to-device copies, each a whole step's values in one tensor:
    #   runner.prepare: input_ids, positions, slot_mapping, cu_seqlens_q, seq_lens, sample_rows,
    #     and the block table's one upload (new entries' positions and values, then the rows:
    #     only the 4 row ids on this step, no block being new);
    #   sampler: one [5, n] table for the sampled rows (row, temperature, top-k, top-p, uniform).
    # No copy per sequence, none per layer (the model and attention make none on the device).
    assert upload_calls(counter) == 8
    assert counter.cross_device == []
    # prepare: the gather of the batch's rows from the persistent block table (a 2-d slice
    # view and one index_select); no index_put_ since no sequence reached a new block.
    assert counter.ops["prepare"] == Counter(
        {"aten.slice.Tensor": 2, "aten.index_select.default": 1}
    )
    # The model outside attention, 2 layers: 9 products (wqkv, wo, w13, w2 per layer, and the
    # head: q/k/v and gate/up as one GEMM each; on the CPU by the library, each allocating its
    # output), 5 norms, rope, residuals, logits' rows.
    model = counter.ops["model"]
    products = model["mkldnn._linear_pointwise.default"] + model["aten.addmm.default"]
    products += model["aten.mm.default"] + model["aten.linear.default"]
    assert products + counter.library_products == 9
    assert model["aten.rms_norm.default"] == 5
    assert counter.total("model") == 74
    # The sampler, 2 of 4 rows sampled with top-k and top-p: every branch, batched.
    assert counter.total("sample") == 36
    # The attention backend is tuned in its own module: bounded, not pinned.
    assert counter.total("attention") <= 90


def test_a_decode_step_on_the_cpu_counts(monkeypatch):
    check_counts(count_decode_step(monkeypatch, torch.device("cpu")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_decode_step_on_cuda_copies_only_through_the_upload_points(monkeypatch):
    counter = count_decode_step(monkeypatch, torch.device("cuda"))
    assert upload_calls(counter) == 8
    # Every host-to-device copy is an upload's non-blocking copy, nothing else crosses.
    assert counter.cross_device == []
    # At most one host-to-device copy per upload (an H200 run, torch 2.11, counted 7 for the 8
    # upload calls: which upload's copy the dispatch mode does not see was not pinned down).
    assert 1 <= counter.host_to_device <= upload_calls(counter), sorted(counter.uploads.items())
