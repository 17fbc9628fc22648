"""margin's rules of its own (CONTRACT.md section 1): the counts are the triplets with a
non-zero positive / negative term, int32, saturating at 2^31 - 1: an anchor with that many makes
the mean over active terms impossible to form, which raises instead of dividing by a saturated
count ("sum" still works)."""
import pytest
import torch

import xbm_kernels as xk


@pytest.mark.backends("reference", "cpu")
def test_saturated_counts_refuse_the_mean(backend, device):
    """One anchor, 50000 positives at d = 1 and 50000 negatives at d = 0.5 (S = 0.5 and 0.875),
    beta 0.7 and margin 0.2: every one of the 2.5e9 triplets has both terms active (0.5 + 0.4)."""
    _saturated(backend, device)


@pytest.mark.backends("triton")
@pytest.mark.cuda_tensors  # 100000 columns: minutes under the interpreter
def test_saturated_counts_refuse_the_mean_on_a_gpu(backend, device):
    _saturated(backend, device)


def _saturated(backend, device):
    n = 50000
    x = torch.tensor([[1.0]], device=device)
    r = torch.cat([torch.full((n, 1), 0.5), torch.full((n, 1), 0.875)]).to(device)
    z = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)]).to(device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    params = dict(margin=0.2, beta=0.7)
    total, counts = xk.losses.compute("margin", x, y, r, z, reduction="sum", backend=backend, **params)
    assert float(total) == pytest.approx(n * n * 0.9, rel=1e-5)  # fp32 terms (CONTRACT.md section 6)
    assert counts.cpu().tolist() == [[2 ** 31 - 1, 2 ** 31 - 1]]
    with pytest.raises(ValueError, match="margin: an anchor has 2147483647 or more active triplet terms"):
        xk.margin_loss(x, y, r, z, reduction="mean", backend=backend, **params)
