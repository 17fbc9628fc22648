"""The Triton launchers' planning, checked without running a kernel (CONTRACT.md section 5): the
split plan covers the memory and fills the device, and every autotune table prunes to
configurations that launch on sm_90 (shared memory within 227 KB, limbs of fp32 anchors
counted), prefers ones that do not spill, and says when none launches. The interpreter runs one
fixed configuration, so these tests run in the main process (TRITON_INTERPRET unset).
tests/test_compile_triton.py compiles what the prunes keep and checks the model."""
import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("TRITON_INTERPRET=1: the tables are the interpreter's one config here", allow_module_level=True)

import triton  # noqa: E402

from xbm_kernels.triton import _common  # noqa: E402
from xbm_kernels.triton import contrastive as tc  # noqa: E402
from xbm_kernels.triton import contrastive_l2 as tl2  # noqa: E402
from xbm_kernels.triton import multi_similarity as tms  # noqa: E402
from xbm_kernels.triton import ntxent as tnx  # noqa: E402
from xbm_kernels.triton import supcon as tsc  # noqa: E402
from xbm_kernels.triton import triplet as ttr  # noqa: E402

DEVICE = torch.device("cuda")  # the plans for a GPU (the SM count is asked only on a real device)
MODULES = {"contrastive": tc, "contrastive_l2": tl2, "multi_similarity": tms, "ntxent": tnx, "supcon": tsc,
           "triplet": ttr}
DIMS = (3, 17, 100, 128, 130, 256, 512, 1024, 2048, 4096)
OPERANDS = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
            "fp16": (torch.float16, torch.float16), "fp32-on-fp16": (torch.float32, torch.float16),
            "fp32-on-bf16": (torch.float32, torch.bfloat16)}


def _kernels():
    for loss_name, m in MODULES.items():
        for k in m.KERNELS:
            yield pytest.param(loss_name, k, id=k.fn.__name__)


def _kept(kernel, D, x_dtype, ref_dtype, count=4096, precision="ieee"):
    nargs = {"x_ptr": torch.empty(0, dtype=x_dtype), "r_ptr": torch.empty(0, dtype=ref_dtype), "B": count, "n": count}
    return kernel.early_config_prune(kernel.configs, nargs, BLOCK_D=_common.block_d(D), PRECISION=precision,
                                     **_common.operand_limbs(x_dtype, ref_dtype))


def test_split_plan_fills_the_device_and_covers_the_memory():
    device = DEVICE if torch.cuda.is_available() else torch.device("cpu")
    for B, n in [(1, 0), (1, 5), (7, 250), (33, 100), (4096, 10 ** 6), (3, 10 ** 6)]:
        splits, cols = tc.split_plan(B, n, device)
        assert splits >= 1 and splits * cols >= n and (splits - 1) * cols < max(n, 1), (B, n, splits, cols)
    assert tc.split_plan(7, 250, device)[0] > 1
    assert tl2.split_plan(1, 5, device)[0] == 1


@pytest.mark.parametrize("loss_name,kernel", list(_kernels()))
def test_every_kept_config_fits_sm90_shared_memory(loss_name, kernel):
    """Kept configs fit in 227 KB by the model (anchors' limbs counted); a shape keeps none only when
    none fits, and then launch_problem says so (the launcher and backend='auto' ask it)."""
    for D in DIMS:
        for name, (x_dtype, ref_dtype) in OPERANDS.items():
            for precision in ("ieee", "tf32"):
                kept = _kept(kernel, D, x_dtype, ref_dtype, precision=precision)
                problem = _common.launch_problem((kernel,), loss_name, D, x_dtype, ref_dtype)
                assert bool(kept) == (problem is None), (D, name, precision, kept, problem)
                if problem:
                    assert f"D = {D}" in problem and "227 KB" in problem
    # wide fp32 rows do not fit (256 KB at D = 2048 for one 16 x 16 tile), 16-bit ones at D = 1024 do
    assert _common.launch_problem((kernel,), loss_name, 4096, torch.float32, torch.float32)
    assert not _common.launch_problem((kernel,), loss_name, 1024, torch.bfloat16, torch.bfloat16)


def test_the_shared_memory_model_counts_limbs():
    """fp32 anchors against a bf16 memory are staged as three 16-bit limbs: a 128 x 64 tile at
    D = 256 that fits in bf16 does not fit with limbs (issue 25's 295 KB case), and is dropped."""
    bf16 = _common.smem_bytes(128, 64, 3, 256, _common.operand_bytes(2, 2, 1), 2)
    limbed = _common.smem_bytes(128, 64, 3, 256, _common.operand_bytes(4, 2, 3), 2)
    assert limbed > _common.SMEM_LIMIT > bf16
    kept = _kept(tc.contrastive_fwd_kernel, 256, torch.float32, torch.bfloat16)
    assert kept and (128, 64, 8, 3) not in [(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                                            for c in kept]


@pytest.mark.parametrize("loss_name,kernel", list(_kernels()))
def test_small_batches_keep_small_row_tiles_and_ieee_fp32_small_tiles(loss_name, kernel):
    rows_name = list(kernel.configs[0].kwargs)[0]
    for D in (17, 128, 256):
        few = _kept(kernel, D, torch.bfloat16, torch.bfloat16, count=3)
        assert few and all(c.kwargs[rows_name] == 16 for c in few), (D, few)
        ieee = _kept(kernel, D, torch.float32, torch.float32)
        tf32 = _kept(kernel, D, torch.float32, torch.float32, precision="tf32")
        assert len(tf32) >= len(ieee) >= 1


def test_wide_rows_fall_back_to_one_config_and_64_row_tiles_serve_16_bit_rows():
    """Where every tile spills, one config (the least shared memory) is kept, not the table; at
    D = 128 in bf16 the contrastive kernel keeps a 64-row (wgmma) tile, at 512 more than one."""
    kept = _kept(tsc.supcon_fwd_kernel, 1024, torch.bfloat16, torch.bfloat16)
    assert len(kept) == 1
    rows = [c.kwargs["BLOCK_B"] for c in _kept(tc.contrastive_fwd_kernel, 128, torch.bfloat16, torch.bfloat16)]
    assert 64 in rows
    assert len(_kept(tc.contrastive_fwd_kernel, 512, torch.bfloat16, torch.bfloat16)) > 1


def test_heuristic_mode_keeps_the_first_fitting_config(monkeypatch):
    """XBM_KERNELS_AUTOTUNE=0: one config per shape (no benchmarking), the table's first that fits."""
    full = _kept(tc.contrastive_fwd_kernel, 128, torch.bfloat16, torch.bfloat16)
    monkeypatch.setenv("XBM_KERNELS_AUTOTUNE", "0")
    assert not _common.autotune_enabled()
    one = _kept(tc.contrastive_fwd_kernel, 128, torch.bfloat16, torch.bfloat16)
    assert len(full) > 1 and one == full[:1]


def test_a_filling_memory_retunes_at_most_three_times():
    """The autotune key of the streamed columns changes at most 3 times while a memory fills
    from one batch to 10^6 rows (powers of two would retune 14 times)."""
    keys = {_common.cols_bucket(n) for n in range(64, 10 ** 6 + 1, 64)}
    assert len(keys) <= 3
    assert len({_common.bucket(n) for n in range(64, 10 ** 6 + 1, 64)}) > 10


def _measured(path=os.path.join(os.path.dirname(__file__), "data", "sm90_calibration.csv")):
    import csv
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


SM90_OPERANDS = {"fp32": (torch.float32, torch.float32, "ieee"), "fp32-tf32": (torch.float32, torch.float32, "tf32"),
                 "bf16": (torch.bfloat16, torch.bfloat16, "ieee"),
                 "fp32-on-bf16": (torch.float32, torch.bfloat16, "ieee")}


def test_the_register_model_agrees_with_ptxas_on_the_measured_table():
    """tests/data/sm90_calibration.csv: supcon's forward kernel compiled for sm_90 (Triton 3.9, ptxas'
    registers and stack per thread) over candidate tiles at D 128-1024, every operand kind. Every
    tile the prune's models admit compiled without spills (at most 8 B of stack) within the shared
    memory limit, and the models admit a spill-free tile wherever ptxas found one; at D = 1024 none
    exists and the prune keeps the tile that spills least there (16 x 16, 8 warps)."""
    fits = tsc.supcon_fwd_kernel.early_config_prune.fits
    rows = _measured()
    assert len(rows) > 90
    free, admitted = set(), set()
    for r in rows:
        x_dtype, ref_dtype, precision = SM90_OPERANDS[r["operands"]]
        D, shape = int(r["D"]), (int(r["D"]), r["operands"])
        b, k, warps, stages = (int(r[c]) for c in ("BLOCK_B", "BLOCK_K", "warps", "stages"))
        config = triton.Config({"BLOCK_B": b, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
        limbs = _common.operand_limbs(x_dtype, ref_dtype)
        nargs = {"x_ptr": torch.empty(0, dtype=x_dtype), "r_ptr": torch.empty(0, dtype=ref_dtype), "B": 4096}
        spills = int(r["spill"]) > 8
        if fits(config, nargs, BLOCK_D=_common.block_d(D), PRECISION=precision, **limbs):
            assert not spills, f"admitted by the model, spills on sm_90: {r}"
            assert int(r["shared"]) <= _common.SMEM_LIMIT, f"admitted by the model, over 227 KB: {r}"
            admitted.add(shape)
        if not spills and int(r["shared"]) <= _common.SMEM_LIMIT:
            free.add(shape)
    assert free <= admitted, f"a spill-free tile exists, the model admits none: {sorted(free - admitted)}"
    assert not any(D == 1024 for D, _ in free)
    for operands in ("fp32", "fp32-tf32", "bf16", "fp32-on-bf16"):
        x_dtype, ref_dtype, precision = SM90_OPERANDS[operands]
        kept = _kept(tsc.supcon_fwd_kernel, 1024, x_dtype, ref_dtype, precision=precision)
        assert [(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_K"], c.num_warps) for c in kept] == [(16, 16, 8)], operands
