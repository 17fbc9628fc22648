"""torch.compile on CPU: a training step with XBMLoss gives the eager losses and gradients.

Three ways to compile, each checked over several steps (memory filling and wrapping):
  model: torch.compile(model), XBMLoss eager              (what train_xbm.py --compile does)
  step:  torch.compile(lambda x, y: crit(model(x), y))    (model + loss in one compiled function)
  loss:  torch.compile(crit), model eager
Graph breaks are allowed (the enqueue updates host-side counters, and CPU inputs get
data-dependent argument checks); test_graph_breaks_are_reported prints where they are.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xbm_kernels as xk

B, D_IN, D, MEM, STEPS, CLASSES = 12, 10, 8, 30, 5, 4
MODES = ("model", "step", "loss")


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D_IN, 32), nn.Linear(32, D)

    def forward(self, x):
        return F.normalize(self.fc2(torch.relu(self.fc1(x))), dim=1)


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(STEPS, B, D_IN, generator=g), torch.randint(0, CLASSES, (STEPS, B), generator=g)


def train(mode):
    """Per-step losses and parameter gradients of STEPS SGD steps."""
    torch.manual_seed(0)
    model = TinyNet()
    crit = xk.XBMLoss(MEM, D, start_iteration=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if mode == "model":
        step = lambda x, y, m=torch.compile(model): crit(m(x), y)  # noqa: E731
    elif mode == "step":
        step = torch.compile(lambda x, y: crit(model(x), y))
    elif mode == "loss":
        step = lambda x, y, c=torch.compile(crit): c(model(x), y)  # noqa: E731
    else:
        step = lambda x, y: crit(model(x), y)  # noqa: E731
    xs, ys = data()
    losses, grads = [], []
    for t in range(STEPS):
        opt.zero_grad()
        loss = step(xs[t], ys[t])
        loss.backward()
        losses.append(loss.detach().clone())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return torch.stack(losses), grads, crit


@pytest.fixture(scope="module")
def eager():
    torch._dynamo.reset()
    return train("eager")


@pytest.mark.parametrize("mode", MODES)
def test_compiled_training_matches_eager(eager, mode):
    torch._dynamo.reset()
    losses, grads, crit = train(mode)
    e_losses, e_grads, e_crit = eager
    assert e_losses[-1] > 0 and len(e_crit.memory) == MEM  # the memory filled and took part
    torch.testing.assert_close(losses, e_losses, rtol=1e-5, atol=1e-6, msg=lambda m: f"{mode}: losses\n{m}")
    for t in range(STEPS):
        for g, eg in zip(grads[t], e_grads[t]):
            torch.testing.assert_close(g, eg, rtol=1e-4, atol=1e-6, msg=lambda m: f"{mode}, step {t}: gradient\n{m}")
    torch.testing.assert_close(crit.memory.embeddings, e_crit.memory.embeddings, rtol=1e-5, atol=1e-6)
    assert torch.equal(crit.memory.labels, e_crit.memory.labels)
    assert int(crit.iteration) == STEPS and crit._iteration == STEPS


def test_graph_breaks_are_reported():
    """Prints the graph breaks of the model + loss step. The only breaks allowed are the
    data-dependent checks (`.item()`: the non-finite enqueue policy and label/index value
    checks); in particular the in-batch loss must not break on a duplicated input."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, crit = TinyNet(), xk.XBMLoss(MEM, D, start_iteration=0)
    xs, ys = data()
    explanation = torch._dynamo.explain(lambda x, y: crit(model(x), y))(xs[0], ys[0])
    print(f"\ngraphs: {explanation.graph_count}, graph breaks: {explanation.graph_break_count}")
    for reason in explanation.break_reasons:
        print(" -", reason.reason.splitlines()[0][:200])
    assert explanation.graph_count >= 1
    reasons = [r.reason for r in explanation.break_reasons]
    assert all("Tensor.item()" in r for r in reasons), reasons
