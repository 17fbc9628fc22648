"""Test data shared by the backend tables: dense L2-normalised embeddings (never zeros)
whose similarities stay away from the loss thresholds, so comparisons test code and not
rounding (DESIGN.md section 6).

Construction: each class has a centre with m = 7 (3 when D < 7) entries of +-1/sqrt(m)
and zeros elsewhere, so centre similarities are multiples of 1/m (never within 0.04 of
the margins 0.5, 0.1, -0.2 used here); every row is its centre plus dense Gaussian
noise, renormalised. Same-class pairs land near 0.99 (positives, below 1 - pos_eps),
other pairs near k/m, and rows are redrawn until every valid pair is > 1e-3 away from
every threshold after rounding to the test dtype."""
import torch
import torch.nn.functional as F

from oracle import min_threshold_distance


def class_centres(n_classes, D, gen):
    m = 7 if D >= 7 else 3 if D >= 3 else 1
    centres = torch.zeros(n_classes, D, dtype=torch.float64)
    for c in range(n_classes):
        cols = torch.randperm(D, generator=gen)[:m]
        signs = torch.randint(0, 2, (m,), generator=gen).double() * 2 - 1
        centres[c, cols] = signs / m ** 0.5
    return centres


def rows_around(centres, labels, gen, noise):
    n, D = labels.shape[0], centres.shape[1]
    eps = F.normalize(torch.randn(n, D, generator=gen, dtype=torch.float64), dim=1)
    return F.normalize(centres[labels] + noise * eps, dim=1)


def make_case(B, N, D, n_classes, seed, *, thresholds=(0.5, 1 - 1e-5), dtype=torch.float32, ref_valid=None,
              noise=0.07, tries=100):
    """Anchors x (B, D), labels y, reference r (N, D), labels z."""
    gen = torch.Generator().manual_seed(seed)
    centres = class_centres(n_classes, D, gen)
    for _ in range(tries):
        y = torch.randint(0, n_classes, (B,), generator=gen)
        z = torch.randint(0, n_classes, (N,), generator=gen)
        x = rows_around(centres, y, gen, noise).to(dtype)
        r = rows_around(centres, z, gen, noise).to(dtype)
        if min_threshold_distance(x, r, thresholds, ref_valid) > 1e-3:
            return x, y, r, z
    raise RuntimeError("could not draw data away from the thresholds")
