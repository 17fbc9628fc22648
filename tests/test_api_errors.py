"""Bad input to the loss functions gets a clear error naming the argument."""
import pytest
import torch

import xbm_kernels as xk


def _good():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    r = torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=1)
    return dict(embeddings=x, labels=torch.arange(6) % 3, ref_embeddings=r, ref_labels=torch.arange(20) % 3)


BAD = [
    ("embeddings", lambda a: a["embeddings"][0], ValueError, "embeddings: expected a 2-D"),
    ("embeddings", lambda a: a["embeddings"].long(), TypeError, "embeddings: expected dtype"),
    ("embeddings", lambda a: a["embeddings"].tolist(), TypeError, "embeddings: expected a torch.Tensor"),
    ("ref_embeddings", lambda a: a["ref_embeddings"][:, :5], ValueError, "ref_embeddings: embedding dim 5"),
    ("ref_embeddings", lambda a: a["ref_embeddings"].to("meta"), ValueError, "ref_embeddings: expected a tensor on"),
    ("labels", lambda a: a["labels"][:4], ValueError, "labels: expected 6 labels"),
    ("labels", lambda a: a["labels"].float(), TypeError, "labels: expected an integer"),
    ("labels", lambda a: a["labels"].view(2, 3), ValueError, "labels: expected a 1-D"),
    ("labels", lambda a: a["labels"] + 2 ** 40, ValueError, "labels: labels must fit in int32"),
    ("ref_labels", lambda a: a["ref_labels"][:3], ValueError, "ref_labels: expected 20 labels"),
    ("ref_labels", lambda a: a["ref_labels"].bool(), TypeError, "ref_labels: expected an integer"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "auto"])
@pytest.mark.parametrize("arg,make,exc,msg", BAD)
def test_bad_tensors(backend, arg, make, exc, msg):
    a = _good()
    a[arg] = make(a)
    with pytest.raises(exc, match=msg):
        xk.contrastive_loss(a["embeddings"], a["labels"], a["ref_embeddings"], a["ref_labels"], backend=backend)


OPTIONS = [
    (dict(ref_valid=21), ValueError, "ref_valid: expected 0 <= ref_valid <= 20"),
    (dict(ref_valid=-1), ValueError, "ref_valid"),
    (dict(ref_valid=2.0), TypeError, "ref_valid: expected an int"),
    (dict(ref_valid=True), TypeError, "ref_valid"),
    (dict(self_index=torch.tensor([0, 1, 2, 3, 4, 20])), ValueError, r"self_index: expected values in \[-1, 20\)"),
    (dict(self_index=torch.tensor([0, 1, 2, 3, 4, -2])), ValueError, "self_index"),
    (dict(self_index=torch.arange(5)), ValueError, "self_index: expected 6 entries"),
    (dict(self_index=torch.arange(6.0)), TypeError, "self_index: expected an integer"),
    (dict(reduction="avg"), ValueError, "reduction: expected one of"),
    (dict(margin=float("nan")), ValueError, "margin: expected a finite number"),
    (dict(margin="0.5"), TypeError, "margin: expected a number"),
    (dict(pos_eps=-1.5), ValueError, r"pos_eps: expected a value in \[-1, 1\]"),
    (dict(margin=1.0), ValueError, r"margin: expected a value in \(-1, 1\)"),
    (dict(backend="cuda"), ValueError, "backend: 'cuda'"),
    (dict(backend="magic"), ValueError, "backend: expected 'auto' or one of"),
]


@pytest.mark.parametrize("kwargs,exc,msg", OPTIONS)
def test_bad_options(kwargs, exc, msg):
    a = _good()
    kwargs = dict(kwargs)
    kwargs.setdefault("backend", "cpu")
    with pytest.raises(exc, match=msg):
        xk.contrastive_loss(a["embeddings"], a["labels"], a["ref_embeddings"], a["ref_labels"], **kwargs)


def test_float64_runs_on_reference_only():
    a = {k: (v.double() if v.is_floating_point() else v) for k, v in _good().items()}
    loss = xk.contrastive_loss(*a.values(), backend="reference")
    assert torch.isfinite(loss)
    with pytest.raises(TypeError, match="embeddings: expected dtype"):
        xk.contrastive_loss(*a.values(), backend="cpu")


def test_available_backends_and_auto():
    names = xk.available_backends()
    assert names[:2] == ["reference", "cpu"]
    assert xk.backends.resolve("auto", torch.device("cpu")) == "cpu"
