"""The suite's one comparison (CONTRACT.md section 6).

An error is measured relative to the largest expected entry of the tensor:

    err = max |actual - expected| / max(max |expected|, FLOOR * scale)

FLOOR = 1.0 is one pair's contribution to a loss row or a gradient entry at unit scale (a
unit-norm row, a coefficient of 1); `scale` is the factor the result was multiplied by
(1 / the denominator for reduction="mean", else 1). The floor keeps a result that nearly
cancels (a row of a few positives at S = 0.999) from asking for more than fp32 holds; it
means the same thing in every file.

Bounds, also stated once:
  FP32          fp32 results against the float64 oracle (S accumulated in fp32).
  grad_bound(d) a gradient returned in the 16-bit dtype d: one rounding of an fp32-accurate
                gradient to d (its unit roundoff) plus FP32; loss rows stay fp32 (FP32).
  TF32          fp32 inputs with TF32 products allowed (S rounded to ~1e-3 relative).
"""
import torch

FLOOR = 1.0
FP32 = 1e-5
TF32 = 2e-3
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def grad_bound(dtype):
    """The bound on a gradient returned in `dtype`, computed from inputs in that dtype."""
    return FP32 + (UNIT_ROUNDOFF[dtype] if dtype != torch.float32 else 0.0)


def max_rel_err(actual, expected, scale=1.0):
    expected = expected.detach().double().cpu()
    err = (actual.detach().double().cpu() - expected).abs()
    if not err.numel():
        return 0.0
    return float(err.max() / expected.abs().max().clamp_min(FLOOR * scale))


def assert_close(actual, expected, tol, what, scale=1.0):
    """max_rel_err(actual, expected, scale) <= tol after checking the shapes; a failure
    shows the worst entries."""
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)}, " \
        f"expected {tuple(expected.shape)}"
    rel = max_rel_err(actual, expected, scale)
    if not rel <= tol:  # also catches NaN
        a, e = actual.detach().double().cpu().flatten(), expected.detach().double().cpu().flatten()
        idx = (a - e).abs().nan_to_num(float("inf")).argsort(descending=True)[:5]
        raise AssertionError(f"{what}: max relative error {rel:.3g} > {tol:g} (floor {FLOOR * scale:g}); worst "
                             f"flat indices {idx.tolist()}: got {a[idx].tolist()}, expected {e[idx].tolist()}")


def assert_equal_counts(actual, expected, what="counts"):
    actual = actual.detach().cpu().long()
    if not torch.equal(actual, expected):
        bad = (actual != expected).any(1).nonzero().flatten()[:5].tolist() if actual.shape == expected.shape else []
        raise AssertionError(f"{what}: differ at rows {bad}: got {actual[bad].tolist() if bad else actual.shape}, "
                             f"expected {expected[bad].tolist() if bad else expected.shape}")


def snapshot(module):
    """Everything a failed call must leave as it was: the state dict (copied), the memories'
    host counters and an XBMLoss's step."""
    import xbm_kernels as xk
    state = {k: v.clone() for k, v in module.state_dict().items()}
    host = {name: (m._ptr, m._num_filled) for name, m in module.named_modules() if isinstance(m, xk.CrossBatchMemory)}
    if isinstance(module, xk.XBMLoss):
        host["step"] = module._iteration
    return state, host


def assert_unchanged(module, snap):
    state, host = snapshot(module)
    before_state, before_host = snap
    assert set(state) == set(before_state)
    for k, v in state.items():
        assert v.dtype == before_state[k].dtype and torch.equal(v, before_state[k]), f"{k} changed"
    assert host == before_host
