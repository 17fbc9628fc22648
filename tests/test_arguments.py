"""Arguments (CONTRACT.md section 7): bad input to the loss functions gets a clear error naming
the argument before anything runs; loss parameters outside the range where they mean something
are refused by the functions and by XBMLoss; labels of any integer dtype that fit in int32
(unsigned too) give the int64 labels' loss; float64 runs on the reference backend only;
`auto` picks a backend."""
import pytest
import torch
import torch.nn.functional as F

import xbm_kernels as xk

import cases

BACKENDS = [b for b in ("reference", "cpu") if b in xk.available_backends()]


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



@pytest.mark.parametrize("xbm_backend", ["reference", "cpu", "auto"])
@pytest.mark.parametrize("arg,make,exc,msg", BAD)
def test_bad_tensors(xbm_backend, arg, make, exc, msg):
    a = _good()
    a[arg] = make(a)
    with pytest.raises(exc, match=msg):
        xk.contrastive_loss(a["embeddings"], a["labels"], a["ref_embeddings"], a["ref_labels"], backend=xbm_backend)


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



@pytest.mark.parametrize("name,kwargs,msg", [
    ("multi_similarity", dict(alpha=0.0), "alpha"),
    ("multi_similarity", dict(beta=float("inf")), "beta"),
    ("supcon", dict(temperature=-1.0), "temperature"),
    ("triplet", dict(margin=float("nan")), "margin"),
    ("triplet", dict(margin=-0.5), "margin"),
    ("contrastive", dict(margin=2.0), r"margin: expected a value in \(-1, 1\)"),
    ("contrastive", dict(margin=-1.0), "margin"),
    ("supcon", dict(pos_eps=1.5), "pos_eps"),
    ("multi_similarity", dict(base=3.0), "base"),
])
def test_bad_loss_parameters(name, kwargs, msg):
    """Values outside the range where a parameter means something (registry.py) are refused
    by the functional loss and by XBMLoss, naming the parameter."""
    d = cases.draw("B7-D96-K50", "triplet", "defaults")
    fn = getattr(xk, f"{name}_loss")
    with pytest.raises(ValueError, match=msg):
        fn(*d.args(), **kwargs)
    with pytest.raises(ValueError, match=msg):
        xk.XBMLoss(10, 96, loss=name, **kwargs)


def test_every_bound_of_every_parameter_is_enforced(loss):
    """From the registry: a value just outside each finite bound is refused, naming the parameter."""
    d = cases.draw("B7-D96-K50", loss, "defaults")
    fn = getattr(xk, f"{loss}_loss")
    for p in xk.LOSSES[loss].parameters:
        for bound, side, is_open in ((p.low, -1, p.open_low), (p.high, 1, p.open_high)):
            if p.kind == "float" and bound is not None:
                bad = bound if is_open else bound + side * 1e-3
                with pytest.raises(ValueError, match=p.name):
                    fn(*d.args(), **{p.name: bad})


def test_bool_parameter_must_be_bool():
    d = cases.draw("B7-D96-K50", "multi_similarity", "defaults")
    with pytest.raises(TypeError, match="mine: expected a bool"):
        xk.multi_similarity_loss(*d.args(), mine=1)


UNSIGNED = [torch.uint8, torch.uint16, torch.uint32, torch.uint64]



@pytest.mark.parametrize("xbm_backend", BACKENDS)
@pytest.mark.parametrize("label_dtype", UNSIGNED)
def test_unsigned_labels_give_the_int64_loss(label_dtype, xbm_backend):
    g = torch.Generator().manual_seed(3)
    x, r = F.normalize(torch.randn(6, 8, generator=g), dim=1), F.normalize(torch.randn(20, 8, generator=g), dim=1)
    y, z = torch.arange(6) % 3 + 40000, torch.arange(20) % 3 + 40000
    if label_dtype == torch.uint8:
        y, z = y - 40000, z - 40000
    expected = xk.contrastive_loss(x, y, r, z, backend=xbm_backend)
    got = xk.contrastive_loss(x, y.to(label_dtype), r, z.to(label_dtype), backend=xbm_backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("arg", ["labels", "ref_labels"])
@pytest.mark.parametrize("label_dtype,value", [(torch.uint32, 2 ** 31), (torch.uint64, 2 ** 31),
                                               (torch.uint64, 2 ** 63 + 5)])
def test_unsigned_labels_beyond_int32_name_the_argument(arg, label_dtype, value):
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    a = {"labels": torch.arange(6).to(label_dtype), "ref_labels": torch.arange(6).to(label_dtype)}
    big = torch.tensor([value], dtype=torch.uint64).to(label_dtype)
    a[arg] = torch.cat([a[arg][:5], big])
    with pytest.raises(ValueError, match=rf"{arg}: labels must fit in int32, got values in \[0, {value}\]"):
        xk.contrastive_loss(x, a["labels"], x, a["ref_labels"])


@pytest.mark.parametrize("label_dtype", UNSIGNED)
def test_unsigned_labels_enqueue_and_xbm(label_dtype):
    mem = xk.CrossBatchMemory(8, 2)
    mem.enqueue(torch.randn(3, 2), torch.tensor([7, 0, 200]).to(label_dtype))
    assert mem.get()[1].tolist() == [7, 0, 200]
    if label_dtype in (torch.uint32, torch.uint64):
        big = torch.tensor([2 ** 32 - 1], dtype=torch.int64).to(label_dtype)
        with pytest.raises(ValueError, match="labels: labels must fit in int32"):
            mem.enqueue(torch.randn(1, 2), big)
    x = F.normalize(torch.randn(6, 4), dim=1)
    y = torch.arange(6) % 3
    torch.testing.assert_close(xk.XBMLoss(16, 4)(x, y.to(label_dtype)), xk.XBMLoss(16, 4)(x, y))
