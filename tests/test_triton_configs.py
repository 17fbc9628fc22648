"""The Triton launchers' planning, checked without running a kernel (CONTRACT.md section 5): the
split plan covers the memory and fills the device, and the GPU autotune tables prune to
configurations that fit sm_90's shared memory and registers (the interpreter runs one fixed
configuration, so only these tests see the GPU tables)."""
import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import triton  # noqa: E402

from xbm_kernels.triton import _common  # noqa: E402
from xbm_kernels.triton import contrastive as tc  # noqa: E402
from xbm_kernels.triton import contrastive_l2 as tl2  # noqa: E402
from xbm_kernels.triton import multi_similarity as tms  # noqa: E402
from xbm_kernels.triton import ntxent as tnx  # noqa: E402
from xbm_kernels.triton import supcon as tsc  # noqa: E402

DEVICE = torch.device("cuda")  # the plans for a GPU (the SM count is asked only on a real device)


def test_split_plan_fills_the_device_and_covers_the_memory():
    device = DEVICE if torch.cuda.is_available() else torch.device("cpu")
    for B, n in [(1, 0), (1, 5), (7, 250), (33, 100), (4096, 10 ** 6), (3, 10 ** 6)]:
        splits, cols = tc.split_plan(B, n, device)
        assert splits >= 1 and splits * cols >= n and (splits - 1) * cols < max(n, 1), (B, n, splits, cols)
    assert tc.split_plan(7, 250, device)[0] > 1
    assert tl2.split_plan(1, 5, device)[0] == 1


def test_contrastive_config_pruning_for_hopper():
    """The contrastive tables prune to configs that fit."""
    fwd = [triton.Config({"BLOCK_B": a, "BLOCK_K": b}, num_warps=w, num_stages=s) for a, b, w, s in _common.FWD_CONFIGS]
    prune = tc._FWD_PRUNE

    def kept(B, D, dtype, precision="ieee"):
        nargs = dict(r_ptr=torch.empty(0, dtype=dtype), B=B)
        return [(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                for c in prune(fwd, nargs, BLOCK_D=D, PRECISION=precision)]

    assert len(kept(256, 128, torch.bfloat16)) >= 6
    assert all(b == 16 for b, *_ in kept(3, 128, torch.bfloat16))  # 3 anchors: no 64-row tiles
    assert all(b * k <= 2048 for b, k, *_ in kept(256, 128, torch.float32))  # FMA dots: small tiles
    assert len(kept(256, 128, torch.float32, "tf32")) > len(kept(256, 128, torch.float32))
    for D, dtype in ((512, torch.float32), (1024, torch.bfloat16)):
        configs = kept(256, D, dtype)
        assert configs and all((s * k + b) * D * dtype.itemsize <= _common.SMEM_BUDGET for b, k, w, s in configs)
    assert kept(256, 4096, torch.float32) == [(16, 16, 4, 1)]  # nothing fits: the smallest



def test_two_accumulator_config_pruning_for_hopper():
    """multi_similarity and supcon: three fp32 (rows x D) register tiles per program, small IEEE fp32 tiles."""
    table = [triton.Config({"BLOCK_B": a, "BLOCK_K": b}, num_warps=w, num_stages=s)
             for a, b, w, s in _common.TWO_ACC_FWD_CONFIGS]

    def kept(prune, B, D, dtype, precision="ieee"):
        nargs = dict(r_ptr=torch.empty(0, dtype=dtype), B=B)
        return [(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                for c in prune(table, nargs, BLOCK_D=D, PRECISION=precision)]

    for prune in (tms._FWD_PRUNE, tsc._FWD_PRUNE):
        bf16 = kept(prune, 256, 128, torch.bfloat16)
        assert len(bf16) >= 5 and all(3 * b * 128 <= w * 32 * 128 for b, _, w, _ in bf16)
        assert all(b * k <= 512 for b, k, *_ in kept(prune, 256, 128, torch.float32))
        assert len(kept(prune, 256, 128, torch.float32, "tf32")) > len(kept(prune, 256, 128, torch.float32))
        assert all(b == 16 for b, *_ in kept(prune, 3, 128, torch.bfloat16))  # 3 anchors: 16-row tiles
        assert kept(prune, 256, 512, torch.bfloat16) == [(16, 16, 4, 1)]  # nothing fits: the smallest



def test_new_loss_config_pruning_for_hopper():
    """contrastive_l2 keeps up to 32 x 64 IEEE fp32 tiles, ntxent (two accumulators and the
    weights) 16 x 32, as multi_similarity (ptxas at D = 128 measured them free of large spills)."""
    table = [triton.Config({"BLOCK_B": a, "BLOCK_K": b}, num_warps=w, num_stages=s)
             for a, b, w, s in _common.TWO_ACC_FWD_CONFIGS]

    def kept(prune, B, D, dtype, precision="ieee"):
        nargs = dict(r_ptr=torch.empty(0, dtype=dtype), B=B)
        return [(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_K"]) for c in prune(table, nargs, BLOCK_D=D, PRECISION=precision)]

    assert tl2._FWD_CONFIGS is _common.TWO_ACC_FWD_CONFIGS  # no 64 x 128 or 128 x 64 tiles
    l2_fp32 = kept(tl2._FWD_PRUNE, 256, 128, torch.float32)
    assert (32, 64) in l2_fp32 and all(b * k <= 2048 for b, k in l2_fp32)
    assert all(b * k <= 512 for b, k in kept(tnx._FWD_PRUNE, 256, 128, torch.float32))
    for prune, tiles in ((tl2._FWD_PRUNE, 2), (tnx._FWD_PRUNE, 3)):
        bf16 = kept(prune, 256, 128, torch.bfloat16)
        assert len(bf16) >= 5 and all(tiles * b * 128 <= 8 * 32 * 128 for b, _ in bf16)
        assert len(kept(prune, 256, 128, torch.float32, "tf32")) > len(kept(prune, 256, 128, torch.float32))

