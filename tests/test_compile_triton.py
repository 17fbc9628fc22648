"""Compile-only check of the Triton kernels for sm_90, without a GPU (as tests/test_cuda_compile.py
does for the CUDA sources). CI runs the kernels under the interpreter, which executes them
as Python and checks no types: a loop-carried variable that changes type, or a constexpr
branch that only the compiler sees, fails only here. Every kernel, for fp32, 16-bit and
limbed (fp32 anchors against a 16-bit memory: 16-bit limbs) operands, multi-similarity's mining on and off
and both phases of its positives kernel.

Runs in the main test process (TRITON_INTERPRET unset: the decorators then build compilable
kernels); skipped under the interpreter or without Triton's NVIDIA backend."""
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
except ImportError as exc:  # an older or newer Triton without the ahead-of-time compile entry points
    pytest.skip(f"Triton {triton.__version__}: no ahead-of-time compile API ({exc})", allow_module_level=True)

from xbm_kernels.triton import _common, contrastive, contrastive_l2, enqueue, multi_similarity  # noqa: E402
from xbm_kernels.triton import circle, margin, ntxent, supcon, triplet, triplet_all  # noqa: E402

# fp32, 16-bit, fp32 anchors in 16-bit limbs (2 for fp16, 3 for bf16); IEEE products
OPERANDS = ("fp32", "bf16", "fp32-on-fp16", "fp32-on-bf16")
KERNELS = {
    "contrastive_fwd": contrastive.contrastive_fwd_kernel,
    "sum_merge": _common.sum_merge_kernel,
    "contrastive_ref_grad": contrastive.contrastive_ref_grad_kernel,
    "contrastive_l2_fwd": contrastive_l2.contrastive_l2_fwd_kernel,
    "contrastive_l2_ref_grad": contrastive_l2.contrastive_l2_ref_grad_kernel,
    "margin_pos": margin.margin_pos_kernel,
    "margin_merge": margin.margin_merge_kernel,
    "multi_similarity_pos": multi_similarity.multi_similarity_pos_kernel,
    "multi_similarity_fwd": multi_similarity.multi_similarity_fwd_kernel,
    "multi_similarity_merge": multi_similarity.multi_similarity_merge_kernel,
    "multi_similarity_ref_grad": multi_similarity.multi_similarity_ref_grad_kernel,
    "supcon_fwd": supcon.supcon_fwd_kernel,
    "supcon_merge": supcon.supcon_merge_kernel,
    "supcon_ref_grad": supcon.supcon_ref_grad_kernel,
    "ntxent_fwd": ntxent.ntxent_fwd_kernel,
    "ntxent_stats_merge": ntxent.ntxent_stats_merge_kernel,
    "ntxent_pos": ntxent.ntxent_pos_kernel,
    "ntxent_merge": ntxent.ntxent_merge_kernel,
    "ntxent_ref_grad": ntxent.ntxent_ref_grad_kernel,
    "triplet_hardest": triplet.triplet_hardest_kernel,
    "triplet_merge": triplet.triplet_merge_kernel,
    "triplet_ref_grad": triplet.triplet_ref_grad_kernel,
    "circle_fwd": circle.circle_fwd_kernel,
    "circle_merge": circle.circle_merge_kernel,
    "circle_ref_grad": circle.circle_ref_grad_kernel,
    "tuplet_margin_pos": ntxent.ntxent_pos_kernel,  # ntxent's with ANGULAR (sm90.autotuned_kernels)
    "tuplet_margin_ref_grad": ntxent.ntxent_ref_grad_kernel,
    "triplet_all_gather": triplet_all.triplet_all_gather_kernel,
    "triplet_all_fwd": triplet_all.triplet_all_fwd_kernel,
    "triplet_all_pos_counts": triplet_all.triplet_all_pos_counts_kernel,
    "triplet_all_merge": triplet_all.triplet_all_merge_kernel,
    "triplet_all_ref_grad": triplet_all.triplet_all_ref_grad_kernel,
    "enqueue": enqueue.enqueue_kernel,
}


# constexprs compiled both ways: mining, the positives kernel's phase, circle's kernels' form (LIFTED: the
# generalized lifted structure loss's), contrastive_l2's per-anchor weights (the margin loss), nca on supcon's kernels
SWITCHES = ("MINE", "FINISH", "LIFTED", "WEIGHTED", "NCA")


def _cases():
    for name, kernel in KERNELS.items():
        switch = next((s for s in SWITCHES if s in sm90.jit_function(kernel).arg_names), None)
        for operands in OPERANDS:
            for on in ((True, False) if switch else (True,)):
                flag = "" if switch is None else f"-{switch.lower()}" if on else f"-no-{switch.lower()}"
                yield pytest.param(name, operands, switch, on, id=f"{name}-{operands}{flag}")


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("name,operands,switch,on", list(_cases()))
def test_kernel_compiles_for_sm90(name, operands, switch, on):
    flags = {**sm90.autotuned_kernels().get(name, (None, {}))[1], **({switch: on} if switch else {})}
    constexprs = sm90.constexprs(operands, **flags, BLOCK_D=64, BLOCK_B=16, BLOCK_K=32, ROWS=16, BLOCK_DC=64,
                                 BLOCK_R=16)
    compiled = sm90.compile_kernel(KERNELS[name], *sm90.OPERANDS[operands][:2], constexprs)
    assert compiled.asm.get("cubin"), f"{name}: no cubin"


# --------------------------------------------------------------------------- resources on sm_90
# Every (kernel, configuration) the launchers' prunes keep, compiled for sm_90: within 227 KB of
# shared memory (and within the prune's model of it, which must not under-estimate), and without
# register spills wherever the prune had a choice (where every tile spills, wide rows, it keeps
# one config, which runs slowly; backend="auto" prefers the CUDA kernel there for the contrastive
# loss). The fast subset: the widest rows, common ones, each two-accumulator forward kernel at the
# widest rows it keeps spill-free configs for (fp32 on FMA units, TF32), and a reference-side
# kernel; the full table is marked slow.


FAST = [("contrastive_fwd", 128, "bf16"), ("supcon_fwd", 256, "fp32-on-bf16"), ("contrastive_fwd", 2048, "bf16"),
        ("supcon_fwd", 1024, "fp32"), ("multi_similarity_fwd-mine", 512, "bf16"), ("supcon_fwd", 512, "fp32"),
        ("multi_similarity_fwd-mine", 256, "fp32"), ("ntxent_fwd", 512, "fp32-tf32"), ("circle_fwd", 256, "fp32"),
        ("supcon_ref_grad", 128, "bf16"), ("generalized_lifted_fwd", 256, "fp32"),
        ("tuplet_margin_pos", 256, "fp32-tf32"), ("tuplet_margin_ref_grad", 128, "bf16"),
        ("triplet_all_fwd", 128, "bf16"), ("triplet_all_ref_grad", 128, "fp32-tf32"),
        ("margin_fwd", 128, "bf16"),
        ("nca_fwd", 256, "fp32"), ("nca_ref_grad", 128, "bf16")]


def _resource_cases(slow):
    for name in sm90.autotuned_kernels():
        for operands in sm90.OPERANDS:
            for D in sm90.DIMS:
                fast = (name, D, operands) in FAST
                if fast != slow:
                    yield pytest.param(name, D, operands, id=f"{name}-D{D}-{operands}",
                                       marks=[pytest.mark.slow, pytest.mark.sm90_table] if slow else [])


def _check_resources(name, D, operands):
    if sm90.cuobjdump() is None:
        pytest.skip("no cuobjdump (Triton's or the CUDA toolkit's) to read the registers")
    kernel, extra = sm90.autotuned_kernels()[name]
    kept = sm90.kept_configs(kernel, D, operands, extra=extra)
    if not kept:
        assert _common.launch_problem((kernel,), name, D, *sm90.OPERANDS[operands][:2]), "kept nothing, said nothing"
        return
    bad = []
    for config in kept:
        shared, regs, spill = sm90.measure(name, D, operands, config)
        label = (config.kwargs, config.num_warps, config.num_stages)
        if shared > sm90.SMEM_LIMIT:
            bad.append(f"{label}: {shared} B of shared memory")
        if spill > 8 and len(kept) > 1:  # 8 B of stack: a call frame or one word, not a slow kernel
            bad.append(f"{label}: {spill} B of spills per thread ({regs} registers)")
    assert not bad, f"{name} D={D} {operands}: " + "; ".join(bad)


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("name,D,operands", list(_resource_cases(slow=False)))
def test_kept_configs_launch_without_spills_on_sm90(name, D, operands):
    _check_resources(name, D, operands)


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("name,D,operands", list(_resource_cases(slow=True)))
def test_kept_configs_launch_without_spills_on_sm90_every_shape(name, D, operands):
    _check_resources(name, D, operands)
