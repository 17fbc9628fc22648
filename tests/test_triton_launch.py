"""backend="auto" never picks Triton for a shape its kernels cannot launch (rows held whole in one
tile: fp32 rows of 2048 need 256 KB of shared memory, sm_90 has 227 KB), and an explicit
backend="triton" says why instead of failing inside the launch (issue 25 item 1). Checked
without a GPU: the backends' availability is replaced by a GPU machine's, and the Triton
launcher's own check runs on CPU tensors with the interpreter off."""
import importlib.util
import os

import pytest
import torch

from xbm_kernels import backends

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("TRITON_INTERPRET=1: every shape launches in the interpreter", allow_module_level=True)

CUDA = torch.device("cuda")
F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture
def gpu_machine(monkeypatch):
    """A GPU machine's backends: triton and cuda usable on CUDA tensors, cuda with the
    contrastive loss only (its one loss kernel)."""
    monkeypatch.setattr(backends, "_usable", lambda name: name in ("reference", "triton", "cuda"))
    monkeypatch.setattr(backends, "_CXX_LOSSES", {"cpu": frozenset(), "cuda": frozenset({"contrastive"})})


@pytest.mark.parametrize("loss_name", sorted(backends._TRITON_LOSSES))
def test_auto_passes_over_triton_where_it_cannot_launch(gpu_machine, loss_name):
    assert backends.resolve("auto", CUDA, loss_name, dim=128, dtypes=(F32, F32)) == "triton"
    assert backends.resolve("auto", CUDA, loss_name, dim=1024, dtypes=(BF16, BF16)) == "triton"
    wide = backends.resolve("auto", CUDA, loss_name, dim=2048, dtypes=(F32, F32))
    assert wide == ("cuda" if loss_name == "contrastive" else "reference")
    assert backends.resolve("auto", CUDA, loss_name, dim=4096, dtypes=(F32, BF16)) != "triton"
    assert backends.resolve("auto", CUDA, loss_name) == "triton"  # no shape given: as before


def test_explicit_triton_names_the_shape(gpu_machine):
    with pytest.raises(ValueError, match=r"backend: the triton backend cannot launch supcon for rows of D = 2048"):
        backends.resolve("triton", CUDA, "supcon", dim=2048, dtypes=(F32, F32))
    assert backends.resolve("triton", CUDA, "supcon", dim=2048, dtypes=(BF16, BF16)) == "triton"


def test_the_launcher_refuses_before_launching():
    """The Triton op called directly with rows no configuration fits raises a ValueError naming D
    (not Triton's OutOfResources from inside the launch)."""
    from xbm_kernels.triton import supcon
    x = torch.zeros(4, 2048)
    with pytest.raises(ValueError, match="D = 2048"):
        supcon._common.require_launchable(supcon.KERNELS, "supcon", x, x)
    supcon._common.require_launchable(supcon.KERNELS, "supcon", x[:, :1024], x[:, :1024])  # fp32 1024: launches


def test_the_public_losses_and_xbmloss_give_auto_the_shape(monkeypatch):
    """xk.<loss>_loss and XBMLoss pass the row width and the operand dtypes to resolve(), so that
    `auto` can pass over a Triton kernel that cannot launch for them."""
    import xbm_kernels as xk
    seen = []
    real = backends.resolve

    def spy(backend, device, op="enqueue", dim=None, dtypes=None):
        seen.append((op, dim, dtypes))
        return real(backend, device, op, dim=dim, dtypes=dtypes)

    monkeypatch.setattr(backends, "resolve", spy)
    x = torch.nn.functional.normalize(torch.randn(4, 6), dim=1)
    xk.supcon_loss(x, torch.arange(4), x.to(BF16), torch.arange(4))
    assert ("supcon", 6, (F32, BF16)) in seen
    xk.XBMLoss(16, 6, loss="triplet", memory_dtype=BF16)(x, torch.arange(4))
    assert ("triplet", 6, (F32, BF16)) in seen
