"""Test data shared by the backend tables: dense L2-normalised embeddings (never zeros)
whose similarities stay away from the loss thresholds, so comparisons test code and not
rounding (CONTRACT.md section 6).

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


# --------------------------------------------------------------------------- the shared tables

# The one case table. name: (B, N, D, classes, ref_valid, self_index mode, margin, noise).
# margin is the contrastive margin the data is kept away from (the other losses' thresholds
# are checked by their own files); noise is make_case's (0.07: same-class S near 0.99).
CASES = {
    "B1-D3": (1, 5, 3, 2, None, None, 0.5, 0.07),                          # K < one tile
    "B7-D96-small-K": (7, 50, 96, 5, None, None, 0.1, 0.07),
    "B7-D96-split": (7, 300, 96, 5, 250, "random", 0.1, 0.25),            # interpreter: 4 memory splits
    "B33-D130-partial": (33, 300, 130, 10, 200, None, 0.1, 0.07),         # unaligned rows, partial memory
    "B33-D130-partial-small": (33, 150, 130, 10, 100, None, 0.1, 0.07),   # interpreter: 3 B tiles x 2 splits
    "B33-D130-partial-self": (33, 300, 130, 10, 200, "random", 0.1, 1.0),  # the same with self_index
    "B33-D96-multi-tile": (33, 2100, 96, 40, None, "random", 0.1, 0.07),  # many tiles, several thread ranges
    "B7-no-positives": (7, 64, 96, 1000, None, None, 0.1, 0.07),
    "B16-all-same-label": (16, 90, 32, 1, 77, "random", 0.1, 0.07),
    "B5-negative-margin": (5, 40, 16, 4, None, None, -0.2, 0.07),
    "B70-D200-two-row-tiles": (70, 700, 200, 20, 650, "random", 0.1, 0.07),
    "B40-D512": (40, 1000, 512, 30, 999, "random", 0.5, 0.07),
    "B9-D1030-slices": (9, 150, 1030, 8, None, None, 0.1, 0.07),          # several dX slices, unaligned
    "B5-D1024-slices": (5, 130, 1024, 6, None, "random", 0.1, 0.07),
    "gpu-B3-huge-K": (3, 100_000, 64, 50, None, "random", 0.1, 0.25),
    "gpu-B64-K50k-partial": (64, 50_000, 128, 200, 45_000, "random", 0.5, 0.25),
    "gpu-B512-D256": (512, 8192, 256, 100, None, "random", 0.1, 0.25),
    "gpu-B200-D512": (200, 4000, 512, 60, 3999, None, 0.1, 0.25),
}
# Which rows each kind of run takes: compiled kernels on the CPU, the Triton interpreter
# (small: it is slow), the CUDA kernels, and the extra GPU-only sizes.
CPU_CASES = ["B1-D3", "B7-D96-small-K", "B33-D130-partial", "B33-D96-multi-tile", "B7-no-positives",
             "B16-all-same-label", "B5-negative-margin"]
INTERPRETER_CASES = ["B1-D3", "B7-D96-split", "B33-D130-partial-small", "B7-no-positives", "B16-all-same-label",
                     "B5-negative-margin"]
CUDA_CASES = CPU_CASES + ["B70-D200-two-row-tiles", "B40-D512", "B9-D1030-slices", "B5-D1024-slices"]
# multi_similarity, triplet and supcon (noise 1: positives overlap negatives, so mining, the
# hardest pairs and the softmax all have work to do)
LOSS_CASES = ["B1-D3", "B7-D96-small-K", "B33-D130-partial-self", "B33-D96-multi-tile", "B7-no-positives",
              "B16-all-same-label"]
GPU_EXTRA_CASES = ["gpu-B3-huge-K", "gpu-B64-K50k-partial", "gpu-B512-D256", "gpu-B200-D512"]

# Tolerances against the float64 oracle: fp32 relative (see assert_rel); 16-bit inputs are
# held to at most 2x the reference backend's error in the same dtype (a measured bound).
FP32_RTOL = 1e-5
LOW_PRECISION_FACTOR = 2.0


def max_rel_err(actual, expected, floor=1e-12):
    """Max |actual - expected| over max(max |expected|, floor): errors are relative to the
    largest entry; `floor` (stated by the caller where it matters, e.g. 1.0 = one pair's
    contribution) keeps results that nearly cancel from asking for more than fp32 holds."""
    expected = expected.double().cpu()
    err = (actual.detach().double().cpu() - expected).abs()
    if not err.numel():
        return 0.0
    return float(err.max() / expected.abs().max().clamp_min(floor))


def assert_rel(actual, expected, tol, what, floor=1e-12):
    """The suite's one comparison: max_rel_err <= tol, else the worst elements are shown."""
    rel = max_rel_err(actual, expected, floor)
    if rel > tol:
        a, e = actual.detach().double().cpu().flatten(), expected.double().cpu().flatten()
        idx = (a - e).abs().argsort(descending=True)[:5]
        raise AssertionError(f"{what}: max relative error {rel:.3g} > {tol:g} (floor {floor:g}); worst flat "
                             f"indices {idx.tolist()}: got {a[idx].tolist()}, expected {e[idx].tolist()}")
