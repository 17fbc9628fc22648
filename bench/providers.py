"""What the benchmark runs: the inputs of one XBM step and the providers that compute the
memory loss (or the enqueue) on them.

A step: anchors x (B, D) with labels y, a full memory M (K, D) with int32 labels z, the
batch already written at slots 0..B-1 (self_index = those slots), as right after
CrossBatchMemory.enqueue at ptr 0. Every provider sees the same tensors.

Providers
  reference   xk.<loss>_loss(..., backend="reference"): dense PyTorch, autograd
  paper-loop  dense S, then a Python loop over anchors that mask-selects each row's
              positives and negatives and sums them (the paper code's structure)
  pml         pytorch-metric-learning's CrossBatchMemory around the equivalent loss on
              cosine similarity (only when the package is installed)
  cpu/triton/cuda  xk.<loss>_loss(..., backend=name): the fused kernels
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import xbm_kernels as xk

DENSE = ("reference", "paper-loop", "pml")  # providers that materialise B x K


@dataclass
class Inputs:
    x: torch.Tensor           # (B, D) anchors, a leaf that requires grad
    y: torch.Tensor           # (B,) int64
    mem: torch.Tensor         # (K, D) memory, rows 0..B-1 hold x
    mem_labels: torch.Tensor  # (K,) int32, as CrossBatchMemory stores them
    slots: torch.Tensor       # (B,) int64: where x sits in the memory

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.x, self.y, self.mem, self.mem_labels, self.slots))


def make_inputs(B, K, D, dtype, device, seed):
    """Clustered unit vectors, labels in K/8 classes, the batch in groups of 4: about 11
    positives per anchor in the memory (mean S 0.67), negatives around S = 0.42 of which
    about 9% are hard (S > 0.5) at D = 128, 0.5% at D = 512. Nothing is zero, so every
    code path and the gradient do real work. Drawn on `device` (a seeded generator
    there), in chunks so K = 1M, D = 512 needs no big temporaries."""
    if not 1 <= B <= K:
        raise ValueError(f"expected 1 <= B <= K (the batch sits in the memory), got B={B}, K={K}")
    g = torch.Generator(device=device).manual_seed(seed)
    classes = max(B // 4, K // 8, 1)
    shared = F.normalize(torch.randn(D, generator=g, device=device), dim=0)
    centers = F.normalize(torch.randn(classes, D, generator=g, device=device), dim=1)
    centers = F.normalize(centers + 1.3 * shared, dim=1)

    def embed(labels):
        noise = F.normalize(torch.randn(labels.numel(), D, generator=g, device=device), dim=1)
        return F.normalize(centers[labels] + 0.7 * noise, dim=1).to(dtype)

    y = torch.randint(0, classes, (-(-B // 4),), generator=g, device=device).repeat_interleave(4)[:B]
    z = torch.randint(0, classes, (K,), generator=g, device=device)
    x = embed(y)
    mem = torch.empty(K, D, dtype=dtype, device=device)
    step = 1 << 16
    for c0 in range(0, K, step):
        mem[c0:c0 + step] = embed(z[c0:c0 + step])
    mem[:B] = x
    z[:B] = y
    return Inputs(x=x.requires_grad_(), y=y, mem=mem, mem_labels=z.to(torch.int32),
                  slots=torch.arange(B, device=device))


def cpu_loss_step(loss, x, inp):
    """Forward and backward of `loss` on the cpu backend against the memory of `inp` (x the
    anchors, requiring grad): one training step's memory loss."""
    out = getattr(xk, f"{loss}_loss")(x, inp.y, inp.mem, inp.mem_labels, self_index=inp.slots, backend="cpu")
    return torch.autograd.grad(out, x)


# ---------------------------------------------------------------- loss providers
# Each builder returns fn(inp, x) -> scalar loss ("mean": sum over anchors / B), or None
# when the provider has no implementation of that loss.

NOT_IMPLEMENTED = "not implemented"


def kernel_implements(backend, loss):
    """Whether kernel backend `backend` has a kernel for `loss` (a loss may land in one
    backend before the others): xbm_kernels.backends.supports; assumes yes if that is
    missing, and the call itself will tell."""
    try:
        from xbm_kernels import backends
        return bool(backends.supports(backend, loss))
    except Exception:  # older/newer registry layout
        return True


def _xk_loss(loss, backend):
    fn = getattr(xk, f"{loss}_loss", None)
    if fn is None:
        return None
    if backend != "reference" and not kernel_implements(backend, loss):
        return NOT_IMPLEMENTED
    return lambda inp, x: fn(x, inp.y, inp.mem, inp.mem_labels, self_index=inp.slots, backend=backend)


def paper_loop_contrastive(x, y, mem, mem_labels, slots, margin=0.5, pos_eps=1e-5):
    """CONTRACT.md section 1, one anchor at a time: S = X M^T densely, then per row
    l_i = sum over positives (same label, not self, S < 1 - eps) of 1 - S
        + sum over negatives (other label, not self) with S > margin of S."""
    S = (x @ mem.T).float()
    cols = torch.arange(mem.shape[0], device=mem.device)
    total = S.new_zeros(())
    for i in range(x.shape[0]):
        row = S[i]
        not_self = cols != slots[i]
        same = mem_labels == y[i]
        pos = torch.masked_select(row, same & not_self)
        pos = torch.masked_select(pos, pos < 1.0 - pos_eps)
        neg = torch.masked_select(row, ~same & not_self)
        neg = torch.masked_select(neg, neg > margin)
        total = total + (1.0 - pos).sum() + neg.sum()
    return total / x.shape[0]


PAPER_LOOPS = {"contrastive": paper_loop_contrastive}


def _paper_loop(loss):
    fn = PAPER_LOOPS.get(loss)
    if fn is None:
        return None
    return lambda inp, x: fn(x, inp.y, inp.mem, inp.mem_labels, inp.slots)


def pml_status():
    """(True, version) when pytorch-metric-learning imports, else (False, reason)."""
    try:
        import pytorch_metric_learning
        from pytorch_metric_learning import distances, losses, reducers  # noqa: F401
        return True, pytorch_metric_learning.__version__
    except Exception as exc:  # an optional dependency: any import failure just drops the provider
        return False, f"{type(exc).__name__}: {exc}"


def _pml_contrastive(D, K):
    """pml's ContrastiveLoss on cosine similarity: relu(1 - S) for positives,
    relu(S - 0.5) for negatives, summed (the paper's negative term is S itself, so pml's
    value is lower by 0.5 per active negative pair; the gradient is the same)."""
    from pytorch_metric_learning import distances, losses, reducers
    loss = losses.ContrastiveLoss(pos_margin=1.0, neg_margin=0.5, distance=distances.CosineSimilarity(),
                                  reducer=reducers.SumReducer())
    return losses.CrossBatchMemory(loss, embedding_size=D, memory_size=K)


PML_LOSSES = {"contrastive": (_pml_contrastive, 0.5)}  # builder, value offset per active negative


class _PmlStep:
    """One pml CrossBatchMemory per input set, holding its own copy of the memory. Each
    call rewinds queue_idx to 0, so pml re-writes x into slots 0..B-1 (where it already
    is) and removes exactly those self-pairs, as the other providers do."""

    def __init__(self, loss):
        self.build = PML_LOSSES[loss][0]
        self.modules = {}

    def __call__(self, inp, x):
        key = id(inp)
        if key not in self.modules:
            K, D = inp.mem.shape
            m = self.build(D, K)
            m.embedding_memory = inp.mem.detach().clone()
            m.label_memory = inp.mem_labels.long()
            m.has_been_filled = True
            self.modules[key] = (m, inp)  # keep inp alive so id() stays unique
        m = self.modules[key][0]
        m.queue_idx = 0
        return m(x, inp.y) / x.shape[0]


def _pml(loss):
    if loss not in PML_LOSSES or not pml_status()[0]:
        return None
    return _PmlStep(loss)


def loss_provider(name, loss):
    """fn(inp, x) -> scalar loss for provider `name`; None if the provider has no such
    loss (no row), NOT_IMPLEMENTED if a kernel backend lacks it (a SKIP row)."""
    if name == "paper-loop":
        return _paper_loop(loss)
    if name == "pml":
        return _pml(loss)
    return _xk_loss(loss, name)


def reference_value_offset(name, loss, inp, margin=0.5):
    """What to add to provider `name`'s loss value to compare it with the reference's
    (pml's contrastive negatives: see _pml_contrastive). Dense; for the check only."""
    if name != "pml" or loss not in PML_LOSSES:
        return 0.0
    with torch.no_grad():
        S = (inp.x.detach() @ inp.mem.T).float()
        diff = inp.y[:, None] != inp.mem_labels[None, :].long()
        diff[torch.arange(inp.x.shape[0], device=S.device), inp.slots] = False
        hard = (diff & (S > margin)).sum().item()
    return PML_LOSSES[loss][1] * hard / inp.x.shape[0]


# ---------------------------------------------------------------- enqueue providers

class PaperQueue:
    """The paper code's queue: slice writes; when a batch does not fit before the end it
    goes to the last rows and the pointer restarts at 0."""

    def __init__(self, K, D, dtype, device):
        self.feats = torch.empty(K, D, dtype=dtype, device=device)
        self.targets = torch.empty(K, dtype=torch.int64, device=device)
        self.ptr = 0

    @torch.no_grad()
    def enqueue(self, x, y):
        q, K = x.shape[0], self.feats.shape[0]
        if self.ptr + q > K:
            self.feats[-q:] = x
            self.targets[-q:] = y
            self.ptr = 0
        else:
            self.feats[self.ptr:self.ptr + q] = x
            self.targets[self.ptr:self.ptr + q] = y
            self.ptr += q


def enqueue_provider(name, K, D, dtype, device):
    """fn(x, y) writing a batch into a fresh K-row memory of provider `name`, or None."""
    if name == "paper-loop":
        return PaperQueue(K, D, dtype, device).enqueue
    if name == "pml":
        if not pml_status()[0]:
            return None
        m = _pml_contrastive(D, K)
        m.embedding_memory = torch.empty(K, D, dtype=dtype, device=device)
        m.label_memory = torch.empty(K, dtype=torch.int64, device=device)
        return lambda x, y: m.add_to_memory(x.detach(), y, x.shape[0])
    memory = xk.CrossBatchMemory(K, D, dtype=dtype, device=device, backend=name)
    return memory.enqueue


def nominal_flops(B, K, D, mode):
    """One B x K x D GEMM for the scores, one more for the gradient (algorithm-independent)."""
    return {"forward": 2 * B * K * D, "full": 4 * B * K * D}.get(mode)


def nominal_bytes(B, K, D, dtype, mode):
    """The memory (embeddings + int32 labels) read once, the anchors read, the gradient written."""
    e = torch.tensor([], dtype=dtype).element_size()
    rw = B * D * e * (2 if mode == "full" else 1)
    return K * D * e + K * 4 + rw + B * 16


def ceil_div(a, b):
    return -(-a // b) if b else 1


def rotation_count(set_bytes, cache_bytes, cap=8):
    """Input sets to rotate through so consecutive calls do not find their inputs in the
    last-level cache: enough to cover twice the cache, at most `cap`; one when a set is
    larger than the cache already."""
    if set_bytes >= cache_bytes:
        return 1
    return max(1, min(cap, ceil_div(2 * cache_bytes, max(set_bytes, 1))))

