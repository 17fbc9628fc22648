"""The op layer against the registry (xbm_kernels/registry.py): the C++ schemas in
csrc/xbm_ops.cpp equal the registry's, and torch.library.opcheck (schema, fake/meta,
dispatcher consistency) passes on every C++ op, so torch.compile can trace them. The Triton
ops get the same opcheck in tests/test_triton_opcheck.py (their own process)."""
import pytest
import torch

import xbm_kernels as xk
from xbm_kernels.registry import ENQUEUE_SCHEMA, LOSSES
from common import make_case

OPS = torch.ops.xbm_kernels
CPU_LOSSES = [l for l in LOSSES.values() if "cpu" in l.kernels]
CXX_LOSSES = [l for l in LOSSES.values() if l.kernels & {"cpu", "cuda"}]
# (loss, device) for every C++ kernel: the CPU ones always, the CUDA ones on a GPU machine
# with the CUDA build (this file is the opcheck of both C++ backends).
HAS_CUDA_KERNELS = torch.cuda.is_available() and xk._ops.has_kernel("contrastive_fwd", "CUDA")
KERNELS = [pytest.param(l, "cpu", id=f"{l.name}-cpu") for l in CPU_LOSSES] + \
    [pytest.param(l, "cuda", id=f"{l.name}-cuda") for l in LOSSES.values() if "cuda" in l.kernels and HAS_CUDA_KERNELS]
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA_KERNELS else [])


def _parsed(name, schema):
    return str(torch._C.parse_schema(f"xbm_kernels::{name}{schema}"))


@pytest.mark.parametrize("loss", CXX_LOSSES, ids=lambda l: l.name)
@pytest.mark.parametrize("phase", ["fwd", "bwd"])
def test_cxx_schema_equals_registry(loss, phase):
    op = getattr(OPS, f"{loss.name}_{phase}")
    assert str(op.default._schema) == _parsed(f"{loss.name}_{phase}", loss.schema(phase))


def test_cxx_enqueue_schema_equals_registry():
    assert str(OPS.enqueue_.default._schema) == _parsed("enqueue_", ENQUEUE_SCHEMA)


def test_every_declared_cpu_kernel_is_registered():
    for loss in CPU_LOSSES:
        for op in loss.op_names():
            assert xk._ops.has_kernel(op, "CPU"), f"{op}: declared with a cpu kernel but the build has none"
    assert set(xk.backends._CXX_LOSSES["cpu"]) == {l.name for l in CPU_LOSSES}


def _args(dtype=torch.float32, with_self=True, device="cpu"):
    x, y, r, z = make_case(9, 70, 24, 4, seed=3, thresholds=(0.1, 0.5, 1 - 1e-5), dtype=dtype)
    si = torch.randint(-1, 60, (9,), generator=torch.Generator().manual_seed(0)) if with_self else None
    return tuple(None if t is None else t.to(device) for t in (x, y.int(), r, z.int(), si))


@pytest.mark.parametrize("loss,device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("need_grad", [True, False])
@pytest.mark.parametrize("with_self", [True, False])
def test_opcheck_fwd(loss, device, dtype, need_grad, with_self):
    x, y, r, z, si = _args(dtype, with_self, device)
    torch.library.opcheck(getattr(OPS, f"{loss.name}_fwd"), (x, y, r, z, si, 60, *loss.values({}), need_grad, False))


@pytest.mark.parametrize("loss,device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_bwd(loss, device, dtype):
    x, y, r, z, si = _args(dtype, device=device)
    g = torch.linspace(0.5, 1.5, 9, device=device)
    torch.library.opcheck(getattr(OPS, f"{loss.name}_bwd"), (x, y, r, z, si, 60, *loss.values({}), g, False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_enqueue(device, dtype):
    mem = torch.zeros(10, 4, dtype=dtype, device=device)
    labels = torch.full((10,), -1, dtype=torch.int32, device=device)
    torch.library.opcheck(OPS.enqueue_, (mem, labels, torch.randn(7, 4, device=device),
                                         torch.arange(7, device=device), 6))


def test_public_wrappers_follow_the_registry():
    import inspect
    for loss in LOSSES.values():
        fn = getattr(xk, f"{loss.name}_loss")
        kw = {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}
        assert {k: kw[k] for k in loss.defaults} == loss.defaults
        assert loss.math in fn.__doc__


@pytest.mark.parametrize("loss", CPU_LOSSES, ids=lambda l: l.name)
def test_torch_compile_matches_eager(loss):
    torch._dynamo.reset()  # a fresh compile per loss (no automatic-dynamic recompiles across the table)
    x0, y, r, z = make_case(9, 70, 24, 4, seed=3, thresholds=(0.1, 0.5, 1 - 1e-5))
    fn = getattr(xk, f"{loss.name}_loss")

    def step(x):
        return fn(x, y, r, z, ref_valid=64, backend="cpu")

    x = x0.clone().requires_grad_()
    eager = step(x)
    eager.backward()
    xc = x0.clone().requires_grad_()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(xc)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(xc.grad, x.grad)
