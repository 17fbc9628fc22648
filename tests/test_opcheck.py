"""torch.library.opcheck on every C++ op (schema, fake/meta, dispatcher consistency), so
torch.compile can trace them; and a torch.compile run of the loss."""
import pytest
import torch

import xbm_kernels as xk
from common import make_case

OPS = torch.ops.xbm_kernels


def _args(dtype=torch.float32, with_self=True):
    x, y, r, z = make_case(9, 70, 24, 4, seed=3, thresholds=(0.1, 1 - 1e-5), dtype=dtype)
    si = torch.randint(-1, 60, (9,), generator=torch.Generator().manual_seed(0)) if with_self else None
    return x, y.int(), r, z.int(), si


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("need_grad", [True, False])
@pytest.mark.parametrize("with_self", [True, False])
def test_opcheck_contrastive_fwd(dtype, need_grad, with_self):
    x, y, r, z, si = _args(dtype, with_self)
    torch.library.opcheck(OPS.contrastive_fwd, (x, y, r, z, si, 60, 0.1, 1e-5, need_grad, False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_contrastive_bwd(dtype):
    x, y, r, z, si = _args(dtype)
    g = torch.linspace(0.5, 1.5, 9)
    torch.library.opcheck(OPS.contrastive_bwd, (x, y, r, z, si, 60, 0.1, 1e-5, g, False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_enqueue(dtype):
    mem = torch.zeros(10, 4, dtype=dtype)
    labels = torch.full((10,), -1, dtype=torch.int32)
    torch.library.opcheck(OPS.enqueue_, (mem, labels, torch.randn(7, 4), torch.arange(7), 6))


def test_torch_compile_matches_eager():
    x0, y, r, z = make_case(9, 70, 24, 4, seed=3, thresholds=(0.1, 1 - 1e-5))

    def step(x):
        return xk.contrastive_loss(x, y, r, z, margin=0.1, ref_valid=64, backend="cpu")

    x = x0.clone().requires_grad_()
    eager = step(x)
    eager.backward()
    xc = x0.clone().requires_grad_()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(xc)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(xc.grad, x.grad)
