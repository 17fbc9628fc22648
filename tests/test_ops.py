"""The op layer against the registry (xbm_kernels/registry.py, CONTRACT.md section 4): every
op's schema is the registry's (the C++ kernels' ops are defined from it in xbm_kernels/_ops.py,
the Triton ops in triton/ops.py), every declared kernel is registered, and
torch.library.opcheck (schema, fake, dispatcher consistency) passes for every op on every
kernel backend and dtype; the public wrappers follow the registry; torch.compile traces
every loss on every backend to the eager result (second derivatives: test_autograd.py)."""
import importlib.util
import inspect
import itertools
import os

import pytest
import torch

import xbm_kernels as xk
from xbm_kernels.registry import ENQUEUE_SCHEMA, LOSSES

import cases
from compare import assert_close

OPS = torch.ops.xbm_kernels
CXX_LOSSES = [l for l in LOSSES.values() if l.kernels & {"cpu", "cuda"}]
TRITON_LOSSES = [l for l in LOSSES.values() if "triton" in l.kernels]


def _parsed(name, schema):
    return str(torch._C.parse_schema(f"xbm_kernels::{name}{schema}"))


@pytest.mark.parametrize("phase", ["fwd", "bwd"])
@pytest.mark.parametrize("spec", CXX_LOSSES, ids=lambda l: l.name)
def test_cxx_schema_is_the_registrys(spec, phase):
    op = getattr(OPS, f"{spec.name}_{phase}")
    assert str(op.default._schema) == _parsed(f"{spec.name}_{phase}", spec.schema(phase))


def test_cxx_enqueue_schema_is_the_registrys():
    assert str(OPS.enqueue_.default._schema) == _parsed("enqueue_", ENQUEUE_SCHEMA)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_schemas_are_the_registrys():
    from xbm_kernels.triton.ops import OPS as TOPS
    names = ["enqueue_"] + [f"{l.name}_{p}" for l in TRITON_LOSSES for p in ("fwd", "bwd")]
    for name in names:
        mine = str(getattr(TOPS, name).default._schema).replace("xbm_kernels_triton::", "xbm_kernels::")
        schema = ENQUEUE_SCHEMA if name == "enqueue_" else LOSSES[name.rsplit("_", 1)[0]].schema(name[-3:])
        assert mine == _parsed(name, schema), name


@pytest.mark.parametrize("device_key", ["CPU", "CUDA"])
def test_every_declared_cxx_kernel_is_registered(device_key):
    backend = device_key.lower()
    if device_key == "CUDA" and not xk._ops.has_kernel("contrastive_fwd", "CUDA"):
        pytest.skip("this build has no CUDA kernels")
    for spec in LOSSES.values():
        if backend in spec.kernels:
            for op in spec.op_names():
                assert xk._ops.has_kernel(op, device_key), f"{op}: declared with a {backend} kernel, the build has none"
    assert set(xk.backends._CXX_LOSSES[backend]) == {l.name for l in LOSSES.values() if backend in l.kernels}


@pytest.mark.triton
def test_the_triton_backend_runs_in_its_process():
    """The Triton process must have the backend: a GPU, or the interpreter with TRITON_INTERPRET=1
    set before triton was imported and an interpreter that runs runtime-bounded loops."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from xbm_kernels.triton import _common
    assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", \
        "run the triton-marked tests with TRITON_INTERPRET=1 without a GPU (tests/run.sh does)"
    assert "triton" in xk.available_backends(), _common.interpreter_problem()


def _op_args(loss, device, dtype, with_self):
    d = cases.draw(cases.SPLIT, loss, "defaults", dtype).to(device)
    si = None
    if with_self:  # -1, columns inside and past ref_valid
        si = (torch.arange(d.x.shape[0], device=device) * 37 % (d.r.shape[0] + 1) - 1).long()
    return (d.x, d.y.int(), d.r, d.z.int(), si, d.ref_valid, *cases.variants(loss)["defaults"].values())


def _ops(backend):
    return xk.backends.kernel_ops(backend)


@pytest.mark.kernels
def test_opcheck_fwd(loss, backend, device, op_dtype):
    """need_grad and self_index on and off, every combination (the interpreter too: about 10 s more)."""
    for need_grad, with_self in itertools.product((True, False), repeat=2):
        args = _op_args(loss, device, op_dtype, with_self)
        torch.library.opcheck(getattr(_ops(backend), f"{loss}_fwd"), args + (need_grad, False))


@pytest.mark.kernels
def test_opcheck_bwd(loss, backend, device, op_dtype):
    args = _op_args(loss, device, op_dtype, True)
    g = torch.linspace(0.5, 1.5, args[0].shape[0], device=device)
    torch.library.opcheck(getattr(_ops(backend), f"{loss}_bwd"), args + (g, False))


@pytest.mark.kernels
def test_opcheck_enqueue(backend, device, op_dtype):
    mem = torch.zeros(10, 4, dtype=op_dtype, device=device)
    labels = torch.full((10,), -1, dtype=torch.int32, device=device)
    torch.library.opcheck(_ops(backend).enqueue_, (mem, labels, torch.randn(7, 4, device=device),
                                                   torch.arange(7, device=device), 6))


def test_public_wrappers_follow_the_registry():
    for spec in LOSSES.values():
        fn = getattr(xk, f"{spec.name}_loss")
        kw = {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}
        assert {k: kw[k] for k in spec.defaults} == spec.defaults
        assert spec.math in fn.__doc__
        assert set(kw) == set(spec.defaults) | {"ref_valid", "self_index", "reduction", "backend"}


@pytest.mark.kernels
def test_torch_compile_matches_eager(loss, backend, device):
    """fullgraph: the fakes let torch.compile trace the op; both gradient paths."""
    torch._dynamo.reset()  # a fresh compile per loss (no automatic-dynamic recompiles across the table)
    d = cases.draw(cases.SPLIT, loss, "defaults").to(device)

    def step(x, r):
        return getattr(xk, f"{loss}_loss")(x, d.y, r, d.z, ref_valid=d.ref_valid, backend=backend)

    # aot_eager traces through the fakes without inductor's C++ build
    compiled = torch.compile(step, backend="inductor" if device == "cuda" else "aot_eager", fullgraph=True)
    for need_ref in (False, True):
        outs = []
        for fn in (step, compiled):
            x, r = d.x.clone().requires_grad_(), d.r.clone().requires_grad_(need_ref)
            out = fn(x, r)
            out.backward()
            outs.append((out.detach(), x.grad, r.grad))
        for a, b in zip(*outs):
            if a is None:
                assert b is None
            else:
                torch.testing.assert_close(b, a)


@pytest.mark.backends("triton")
def test_triton_launchers_check_their_arguments(loss, backend, device):
    args = _op_args(loss, device, torch.float32, True)
    fwd = getattr(_ops(backend), f"{loss}_fwd")
    bwd = getattr(_ops(backend), f"{loss}_bwd")
    with pytest.raises(ValueError, match="labels: expected int32"):
        fwd(args[0], args[1].long(), *args[2:], True, False)
    with pytest.raises(ValueError, match="ref_valid"):
        fwd(*args[:5], args[2].shape[0] + 1, *args[6:], True, False)
    with pytest.raises(ValueError, match="grad_rows"):
        bwd(*args, torch.ones(3, device=device), False)


@pytest.mark.backends("triton")
def test_triton_launchers_check_loss_parameters(backend, device):
    d = cases.draw(cases.SPLIT, "supcon", "defaults").to(device)
    args = (d.x, d.y.int(), d.r, d.z.int(), None, d.ref_valid)
    with pytest.raises(ValueError, match="temperature"):
        _ops(backend).supcon_fwd(*args, 0.0, 1e-5, True, False)
    with pytest.raises(ValueError, match="alpha"):
        _ops(backend).multi_similarity_fwd(*args, -2.0, 40.0, 0.5, 0.1, 1e-5, True, True, True, False)
