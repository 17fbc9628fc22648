"""What every test file shares: the helper modules on sys.path, the hypothesis profile, and
the parameters a property runs over, derived from the registry (xbm_kernels/registry.py)
and from what this process can run (xk.available_backends()).

A test asks for them by argument name and gets every combination:
  backend, device  every usable backend with the device its tensors live on (reference and
                   cpu on CPU tensors; triton on CUDA tensors, or CPU tensors under
                   TRITON_INTERPRET=1; cuda and reference on CUDA tensors on a GPU).
                   @pytest.mark.kernels leaves the reference backend out,
                   @pytest.mark.backends("triton", ...) keeps the named ones,
                   @pytest.mark.cuda_tensors keeps CUDA tensors, @pytest.mark.cpu_tensors CPU ones.
  loss             every registry loss (with `backend`: those the backend implements)
  variant          every parameter set of the loss (cases.variants)
  case             every case of the table (cases.CASES) tagged for the backend's run kind;
                   @pytest.mark.structure("in-batch", ...) keeps those with that self_index
  dtype            the 16-bit dtypes the backend takes (fp16 only under the interpreter,
                   whose bf16 tl.dot is wrong on CPU)
  op_dtype         fp32 and those
A property with no combination here (the Triton backend in the main process, CUDA tensors
without a GPU) is one item that says why it is skipped, with the markers of what it needs, so
that the process that can run it selects it.

Markers are applied here, from the parameters: `triton` (the Triton backend: tests/run.sh
runs these in their own process, TRITON_INTERPRET=1 set before triton is imported when
there is no GPU), `gpu` (CUDA tensors), `gpu_quick` (on CUDA tensors, the quick cases and
the default parameters: every op, backend and dtype in a few minutes)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # cases, oracle, compare: helper modules, not test files

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, database=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("long", max_examples=500, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import xbm_kernels as xk  # noqa: E402
from xbm_kernels.registry import LOSSES  # noqa: E402

import cases  # noqa: E402

GPU = torch.cuda.is_available()
LOW_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DTYPES = dict(LOW_DTYPES, fp32=torch.float32)


def backend_devices():
    """(backend, device) pairs this process runs."""
    out = []
    for b in xk.available_backends():
        if b == "reference":
            out += [(b, "cpu")] + ([(b, "cuda")] if GPU else [])
        elif b == "cpu":
            out.append((b, "cpu"))
        elif b == "triton":
            out.append((b, "cuda" if GPU else "cpu"))
        elif b == "cuda":
            out.append((b, "cuda"))
    return out


def implements(backend, loss):
    """Declared in the registry (a declared kernel missing from the build fails, it does not vanish)."""
    return backend == "reference" or backend in LOSSES[loss].kernels


def dtypes_for(backend, device):
    if backend == "triton" and device == "cpu":
        return ["fp16"]
    return list(LOW_DTYPES)


def _combos(metafunc):
    names = metafunc.fixturenames
    kernels_only = metafunc.definition.get_closest_marker("kernels") is not None
    only = metafunc.definition.get_closest_marker("backends")
    cuda_only = metafunc.definition.get_closest_marker("cuda_tensors") is not None
    cpu_only = metafunc.definition.get_closest_marker("cpu_tensors") is not None
    combos = [{}]
    if "loss" in names:
        combos = [{"loss": loss} for loss in LOSSES]
    if "variant" in names:
        combos = [dict(c, variant=v) for c in combos for v in cases.variants(c["loss"])]
    if "backend" in names:
        bds = [bd for bd in backend_devices() if not (kernels_only and bd[0] == "reference")
               and (only is None or bd[0] in only.args) and (not cuda_only or bd[1] == "cuda")
               and (not cpu_only or bd[1] == "cpu")]
        combos = [dict(c, backend=b, device=d) for c in combos for b, d in bds
                  if "loss" not in c or implements(b, c["loss"])]
    if "case" in names:
        structure = metafunc.definition.get_closest_marker("structure")
        combos = [dict(c, case=n) for c in combos
                  for n in cases.names(cases.run_kind(c["backend"], c["device"]) if "backend" in c else "cpu")
                  if structure is None or cases.CASES[n].self_index in structure.args]
    if "dtype" in names:
        combos = [dict(c, dtype=t) for c in combos for t in dtypes_for(c["backend"], c["device"])]
    if "op_dtype" in names:
        combos = [dict(c, op_dtype=t) for c in combos for t in ["fp32"] + dtypes_for(c["backend"], c["device"])]
    return combos


def _missing(metafunc):
    """The markers and the reason of the one skipped item of a property with no combination."""
    only = metafunc.definition.get_closest_marker("backends")
    marks = [pytest.mark.triton] if only is not None and "triton" in only.args else []
    if metafunc.definition.get_closest_marker("cuda_tensors") is not None:
        marks.append(pytest.mark.gpu)
    wanted = ("CUDA tensors " if metafunc.definition.get_closest_marker("cuda_tensors") else "") + \
        (f"backends {list(only.args)}" if only is not None else "a kernel backend")
    return marks + [pytest.mark.skip(reason=f"needs {wanted}; this process has {backend_devices()}")]


def _marks(c):
    marks = []
    if c.get("backend") == "triton":
        marks.append(pytest.mark.triton)
    if c.get("device") == "cuda":
        marks.append(pytest.mark.gpu)
        quick_case = "case" not in c or "quick" in cases.CASES[c["case"]].tags
        if quick_case and c.get("variant", "defaults") == "defaults":
            marks.append(pytest.mark.gpu_quick)
    return marks


def pytest_generate_tests(metafunc):
    keys = [k for k in ("loss", "variant", "backend", "device", "case", "dtype", "op_dtype")
            if k in metafunc.fixturenames]
    if not keys:
        return
    if "device" in keys and "backend" not in keys:
        raise pytest.UsageError(f"{metafunc.function.__name__}: `device` comes with `backend`")
    combos = _combos(metafunc)
    values = []
    for c in combos:
        shown = [c["backend"] + ("" if c["device"] == "cpu" else "-" + c["device"]) if k == "backend" else str(c[k])
                 for k in keys if k != "device"]
        args = [DTYPES[c[k]] if k in ("dtype", "op_dtype") else c[k] for k in keys]
        values.append(pytest.param(*args, marks=_marks(c), id="-".join(shown)))
    if not values:
        values = [pytest.param(*[None] * len(keys), marks=_missing(metafunc), id="not-here")]
    metafunc.parametrize(",".join(keys), values)


@pytest.fixture
def threads():
    """Sets torch's thread count for a test and restores it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
