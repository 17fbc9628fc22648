"""Argument errors at the places users meet them first (CONTRACT.md section 7): the message
starts with the argument's name, as the user spelled it, and nothing changes."""
import pytest
import torch

import xbm_kernels as xk


@pytest.mark.parametrize("kw, name", [(dict(memory_size=0, embedding_dim=4), "memory_size"),
                                      (dict(memory_size=2 ** 31, embedding_dim=4), "memory_size"),
                                      (dict(memory_size=8, embedding_dim=0), "embedding_dim")])
def test_xbmloss_sizes_are_named_as_passed(kw, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected 1 <= {name} <= 2147483647"):
        xk.XBMLoss(**kw)


def test_a_mistyped_keyword_names_the_function(loss):  # every registry loss (conftest)
    x = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    y = torch.arange(3)
    fn = getattr(xk, f"{loss}_loss")
    with pytest.raises(TypeError, match=rf"^{loss}_loss: .*'not_a_parameter'.*accepted keywords: \["):
        fn(x, y, x, y, not_a_parameter=1)


def test_xbmloss_state_dict_moves_across_losses_and_memory_dtypes():
    """The state holds the step and the memory, which do not depend on the loss: it loads into
    another loss, rows cast to the receiving memory's dtype (CONTRACT.md section 2)."""
    a = xk.XBMLoss(16, 8, loss="contrastive", memory_dtype=torch.float32)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        a(torch.randn(5, 8, generator=g), torch.randint(0, 3, (5,), generator=g))
    b = xk.XBMLoss(16, 8, loss="supcon", memory_dtype=torch.bfloat16)
    b.load_state_dict(a.state_dict())
    assert b.memory.dtype == torch.bfloat16 and int(b.iteration) == 3 and len(b.memory) == 15
    assert torch.equal(b.memory.embeddings, a.memory.embeddings.to(torch.bfloat16))
    assert torch.equal(b.memory.labels, a.memory.labels)


def test_xbmloss_memory_dtype_is_named_as_passed():
    with pytest.raises(TypeError, match=r"^memory_dtype: "):
        xk.XBMLoss(16, 8, memory_dtype=torch.int32)


def test_an_unavailable_backend_says_why():
    """backend='triton' without a GPU says that it needs one and what TRITON_INTERPRET is for."""
    if "triton" in xk.available_backends():
        pytest.skip("the Triton backend is available in this process")  # the interpreter process
    x = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    with pytest.raises(ValueError, match=r"^backend: 'triton' is not available here \((triton is not installed|"
                                         r"it runs on CUDA GPUs.*TRITON_INTERPRET=1)"):
        xk.contrastive_loss(x, torch.arange(3), x, torch.arange(3), backend="triton")


def test_fp32_on_a_gpu_kernel_warns_once_about_the_fma_units(monkeypatch):
    """Issue 25 item 6: the warning a GPU user sees once (simulated: a tensor that says it is
    on CUDA); none for the CPU backend, a bf16 memory, or TF32 allowed."""
    from xbm_kernels import losses

    class OnCuda:
        def __init__(self, dtype):
            self.dtype, self.device = dtype, torch.device("cuda")

    monkeypatch.setattr(losses, "_FMA_WARNED", [])
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses._warn_fp32_on_fma("cpu", OnCuda(torch.float32), OnCuda(torch.float32))
        losses._warn_fp32_on_fma("triton", OnCuda(torch.float32), OnCuda(torch.bfloat16))
        assert not caught
        losses._warn_fp32_on_fma("triton", OnCuda(torch.float32), OnCuda(torch.float32))
        losses._warn_fp32_on_fma("cuda", OnCuda(torch.float32), OnCuda(torch.float32))
    assert len(caught) == 1 and "set_float32_matmul_precision('high')" in str(caught[0].message)
    monkeypatch.setattr(losses, "_FMA_WARNED", [])
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses._warn_fp32_on_fma("triton", OnCuda(torch.float32), OnCuda(torch.float32))
    assert not caught
