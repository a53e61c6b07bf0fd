"""The launch choices paged_attention makes only on CUDA (from the device's SM count), checked on
the CPU with the SM count given: when the key range is split over several programs."""

import pytest
import torch

from kernels import paged_attention as pa

H100_SMS = 132


@pytest.fixture
def sms(monkeypatch):
    monkeypatch.setattr(pa, "_num_sms", lambda index: H100_SMS)


def test_splits_only_where_the_grid_leaves_the_gpu_idle(sms):
    cuda = torch.device("cuda", 0)
    target = pa._TARGET_PROGRAMS_PER_SM * H100_SMS
    assert pa._choose_num_splits(cuda, target, 100_000) == 1  # a full grid
    assert pa._choose_num_splits(cuda, 8, None) == 1  # length unknown: no sync to learn it
    assert pa._choose_num_splits(cuda, 8, 8191) == 8191 // pa._MIN_KEYS_PER_SPLIT  # by length
    assert pa._choose_num_splits(cuda, 8, 10**6) == pa._MAX_SPLITS
    assert pa._choose_num_splits(cuda, 200, 10**6) == 2  # ceil(264 / 200)
    assert pa._choose_num_splits(cuda, 8, 100) == 1  # short keys: not worth merging
    assert pa._choose_num_splits(torch.device("cpu"), 8, 10**6) == 1  # the interpreter


@pytest.mark.parametrize(
    "group, head_dim, max_seqlen_q, is_fp32, arch, expected",
    [
        (4, 128, 1, False, 90, (16, 4, 64)),  # decode, bf16: the smallest tile for a group
        (4, 128, 512, False, 90, (64, 16, 64)),  # prefill, bf16: 64 rows, one wgmma tile
        (4, 128, 512, False, 80, (64, 16, 32)),  # sm_80, no wgmma: 32 keys a step, no spills
        (4, 80, 512, False, 80, (64, 16, 32)),  # BLOCK_D 128 too
        (4, 64, 512, False, 80, (64, 16, 64)),  # BLOCK_D 64 fits 64 keys
        (4, 128, 1, False, 80, (16, 4, 64)),  # decode: as on sm_90
        (4, 256, 512, False, 90, (32, 8, 32)),  # wide heads: smaller tiles
        (32, 64, 1, False, 90, (32, 1, 64)),  # a group wider than 16 rows
        (4, 128, 512, True, 90, (16, 4, 64)),  # fp32: the correctness path, small tiles
    ],
)
def test_tiles(group, head_dim, max_seqlen_q, is_fp32, arch, expected):
    block_m, block_q, block_n = pa._choose_tiles(group, head_dim, max_seqlen_q, is_fp32, arch)
    assert (block_m, block_q, block_n) == expected
    assert block_m == block_q * group


def test_split_decode_at_head_64_takes_two_stages_on_sm90():
    # At 3 stages ptxas spills 12 bytes of this variant on sm_90 (tests/kernels/test_aot_compile.py).
    def stages(arch: int, split_kv: bool, head_dim: int = 64) -> int:
        tiles = pa._choose_tiles(4, head_dim, 1, False, arch)
        variant = pa._attention_variant(
            4,
            head_dim,
            torch.bfloat16,
            16,
            tiles,
            split_kv=split_kv,
            one_tile_per_seq=True,
            arch=arch,
        )
        return variant.num_stages

    assert stages(90, True) == 2
    assert (stages(90, False), stages(80, True), stages(90, True, head_dim=128)) == (3, 3, 3)


def test_device_arch_off_cuda_is_the_interpreters(monkeypatch):
    monkeypatch.setattr(pa, "INTERPRETER_ARCH", 80)
    assert pa.device_arch(torch.device("cpu")) == 80
