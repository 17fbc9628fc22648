"""The Triton margin loss's own kernels (triton/margin.py: the positives kernel over the
candidate rows and the merge that combines it with contrastive_l2's pass over the negatives)
compile for sm_90, and the positives kernel's kept configurations fit: within 227 KB of shared
memory and without register spills wherever the prune had a choice (the pass is contrastive_l2's
forward kernel, WEIGHTED: tests/test_compile_triton.py's margin_fwd). Compile-only, without a
GPU; skipped under the interpreter or without Triton's NVIDIA backend (as test_compile_triton.py)."""
import importlib.util
import os

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted functions here", allow_module_level=True)

import triton  # noqa: E402

try:
    import sm90  # a helper module, not a test file: conftest puts tests/ on sys.path
except ImportError as exc:
    pytest.skip(f"Triton {triton.__version__}: no ahead-of-time compile API ({exc})", allow_module_level=True)

from xbm_kernels.triton import _common, margin  # noqa: E402

KERNELS = {"margin_pos": margin.margin_pos_kernel, "margin_merge": margin.margin_merge_kernel}


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("need_grad", (True, False), ids=("grad", "no-grad"))
@pytest.mark.parametrize("operands", ("fp32", "bf16", "fp32-on-fp16", "fp32-on-bf16"))
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_compiles_for_sm90(name, operands, need_grad):
    constexprs = sm90.constexprs(operands, NEED_GRAD=need_grad, BLOCK_D=64, BLOCK_B=16, BLOCK_K=32, ROWS=16)
    compiled = sm90.compile_kernel(KERNELS[name], *sm90.OPERANDS[operands][:2], constexprs)
    assert compiled.asm.get("cubin"), f"{name}: no cubin"


FAST = [(128, "bf16"), (128, "fp32-on-bf16"), (3, "fp32-on-fp16"), (256, "fp32-tf32"), (512, "fp32")]


def _resource_cases():
    for operands in sm90.OPERANDS:
        for D in sm90.DIMS:
            slow = (D, operands) not in FAST
            yield pytest.param(D, operands, id=f"margin_pos-D{D}-{operands}",
                               marks=[pytest.mark.slow, pytest.mark.sm90_table] if slow else [])


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("D,operands", list(_resource_cases()))
def test_positives_kernel_fits_on_sm90(D, operands):
    if sm90.cuobjdump() is None:
        pytest.skip("no cuobjdump (Triton's or the CUDA toolkit's) to read the registers")
    kernel = margin.margin_pos_kernel
    kept = sm90.kept_configs(kernel, D, operands)
    if not kept:
        assert _common.launch_problem((kernel,), "margin", D, *sm90.OPERANDS[operands][:2]), "kept nothing"
        return
    bad = []
    for config in kept:
        c = sm90.constexprs(operands, BLOCK_D=_common.block_d(D), **config.kwargs)
        compiled = sm90.compile_kernel(kernel, *sm90.OPERANDS[operands][:2], c, config.num_warps, config.num_stages)
        shared, regs, spill = sm90.resources(compiled)
        label = (config.kwargs, config.num_warps, config.num_stages)
        if shared > sm90.SMEM_LIMIT:
            bad.append(f"{label}: {shared} B of shared memory")
        if spill > 8 and len(kept) > 1:  # 8 B of stack: a call frame or one word, not a slow kernel
            bad.append(f"{label}: {spill} B of spills per thread ({regs} registers)")
    assert not bad, f"margin_pos D={D} {operands}: " + "; ".join(bad)
