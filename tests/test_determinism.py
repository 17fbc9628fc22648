"""Determinism (CONTRACT.md section 5): repeated runs are bitwise identical on every backend;
the answer does not depend on how the memory is cut: the Triton launchers at any number of
splits, the CPU kernels at any number of threads (each thread range merged in order), both
against the oracle and each other."""
import importlib

import pytest
import torch

import xbm_kernels as xk

import cases
from compare import FP32, assert_close, assert_equal_counts


def _run(loss, d, params, backend, need_ref):
    x = d.x.clone().requires_grad_()
    r = d.r.clone().requires_grad_(need_ref)
    out, counts = xk.losses.compute(loss, x, d.y, r, d.z, ref_valid=d.ref_valid, self_index=d.self_index,
                                    reduction="mean", backend=backend, **params)
    out.backward()
    return out.detach(), counts, x.grad, r.grad


def test_repeated_runs_are_bitwise_identical(loss, backend, device):
    """Both gradient paths (the fused one and the bwd op), on the case with the most splits."""
    case = cases.MANY_SPLITS[cases.run_kind(backend, device)]
    params = cases.variants(loss)["defaults"]
    d = cases.draw(case, loss, "defaults").to(device)
    for need_ref in (False, True):
        a, b = (_run(loss, d, params, backend, need_ref) for _ in range(2))
        for u, v in zip(a, b):
            assert (u is None and v is None) or torch.equal(u, v), (need_ref, u, v)


def _launcher_args(d, params):
    si = None if d.self_index is None else d.self_index.long()
    return (d.x, d.y.int(), d.r, d.z.int(), si, d.ref_valid, *params.values())


@pytest.mark.backends("triton")
def test_any_split_count_gives_the_same_answer(loss, variant, backend, device):
    """The Triton forward at one split, splits that do and do not align with tiles, 5-column
    splits and the launcher's plan: every merge gives the oracle's rows, counts and gradient;
    only the order of fp32 additions differs."""
    case = cases.SPLIT
    params = cases.variants(loss)[variant]
    d = cases.draw(case, loss, variant).to(device)
    rows_e, gx_e, _, counts_e = cases.expected(case, loss, variant)
    gx_e = gx_e / cases.weights(d.x.shape[0])[:, None]  # the forward's gradient is that of sum_i l_i
    fwd = getattr(importlib.import_module(f"xbm_kernels.triton.{loss}"), f"{loss}_fwd_triton")
    outs = [fwd(*_launcher_args(d, params), True, False, splits=s) for s in (1, 2, 7, d.ref_valid // 5, None)]
    for s, (rows, grad, counts) in zip((1, 2, 7, "n/5", "plan"), outs):
        assert_close(rows, rows_e, FP32, f"rows ({s} splits)")
        assert_equal_counts(counts, counts_e, f"counts ({s} splits)")
        assert_close(grad, gx_e, FP32, f"grad ({s} splits)")
        assert_close(rows, outs[0][0].double(), 2e-6, f"rows ({s} splits) against one split")


@pytest.mark.backends("cpu")
def test_thread_count_does_not_change_the_answer(loss, variant, backend, device, threads):
    """The CPU ops at 3 threads (uneven ranges of tiles, each with running maxima and shifts of
    its own, merged in order) and at 1 agree beyond rounding, counts exactly (test_values.py
    compares the default thread count with the oracle on the same case)."""
    case = cases.MANY_SPLITS["cpu"]
    params = cases.variants(loss)[variant]
    d = cases.draw(case, loss, variant)
    w = cases.weights(d.x.shape[0]).float()
    op_fwd = getattr(torch.ops.xbm_kernels, f"{loss}_fwd")
    op_bwd = getattr(torch.ops.xbm_kernels, f"{loss}_bwd")
    outs = {}
    for n in (3, 1):
        threads(n)
        outs[n] = op_fwd(*_launcher_args(d, params), True, False) + op_bwd(*_launcher_args(d, params), w, False)
    assert_equal_counts(outs[3][2], outs[1][2].long(), "counts: 3 threads against 1")
    for k, what in ((0, "rows"), (1, "grad"), (3, "grad_x"), (4, "grad_ref")):
        assert_close(outs[3][k].double(), outs[1][k].double(), 1e-6, f"{what}: 3 threads against 1")


_LANES_SCRIPT = """
import sys, torch
import cases
loss, variant, out = sys.argv[1:]
d = cases.draw(cases.MANY_SPLITS["cpu"], loss, variant)
params = cases.variants(loss)[variant]
si = None if d.self_index is None else d.self_index.long()
args = (d.x, d.y.int(), d.r, d.z.int(), si, d.ref_valid, *params.values())
fwd = getattr(torch.ops.xbm_kernels, loss + "_fwd")(*args, True, False)
bwd = getattr(torch.ops.xbm_kernels, loss + "_bwd")(*args, cases.weights(d.x.shape[0]).float(), False)
torch.save(list(fwd) + list(bwd), out)
"""


@pytest.mark.backends("cpu")
@pytest.mark.parametrize("loss_name", ["multi_similarity", "supcon", "ntxent", "nca", "circle", "generalized_lifted",
                                       "contrastive", "contrastive_l2", "margin", "triplet", "triplet_all"])
def test_vector_width_does_not_change_the_answer(loss_name, backend, device, tmp_path):
    """The vector epilogues at 4 lanes (XBM_CPU_LANES=4: the build every x86-64 and aarch64
    CPU runs) and at the CPU's widest (8 with AVX2, 16 with AVX-512, chosen at run time) agree
    beyond rounding, counts exactly: the same per-lane arithmetic, summed in another order."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), here]))
    outs = {}
    for lanes in ("4", "16"):
        out = str(tmp_path / f"{lanes}.pt")
        proc = subprocess.run([sys.executable, "-c", _LANES_SCRIPT, loss_name, "defaults", out], cwd=here,
                              env=dict(env, XBM_CPU_LANES=lanes), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[lanes] = torch.load(out)
    assert_equal_counts(outs["16"][2], outs["4"][2].long(), "counts: widest lanes against 4")
    for k, what in ((0, "rows"), (1, "grad"), (3, "grad_x"), (4, "grad_ref")):
        assert_close(outs["16"][k].double(), outs["4"][k].double(), 1e-6, f"{what}: widest lanes against 4")
