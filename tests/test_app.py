"""End-to-end tests of the training application python/train_xbm.py (on scikit-learn's
digits, which ship offline): Recall@K on a hand-checked example, exact resume from a
checkpoint, and the command line."""
import os
import subprocess
import sys

import pytest
import torch

APP_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
sys.path.insert(0, APP_DIR)

pytest.importorskip("sklearn")  # the digits set ships with scikit-learn
import train_xbm  # noqa: E402


def test_recall_at_k_hand_example():
    # Five unit vectors; dot products: p0.p1 .8, p0.p2 .6, p0.p3 0, p1.p2 .96, p1.p3 .6, p2.p3 .8,
    # p4 = -p0 is far from everything.
    emb = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 0, 2])
    # neighbours (most similar first, self excluded) and their labels:
    #   p0: p1(1) p2(0) ...    -> first hit at rank 2
    #   p1: p2 p0 p3 p4        -> no other item of class 1: never a hit
    #   p2: p1(1) p3(0) ...    -> rank 2
    #   p3: p2(0) ...          -> rank 1
    #   p4: class 2 alone      -> never
    expected = {1: 1 / 5, 2: 3 / 5, 4: 3 / 5, 8: 3 / 5}
    for chunk in (1, 2, 3, 2048):  # chunking must not move the self-exclusion
        got = train_xbm.recall_at_k(emb, labels, chunk=chunk)
        assert got == pytest.approx(expected), f"chunk={chunk}: got {got}, expected {expected}"


def test_recall_at_k_excludes_self_and_counts_singletons():
    emb = torch.nn.functional.normalize(torch.randn(12, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    # every item alone in its class: a query that found itself would score 1
    assert train_xbm.recall_at_k(emb, torch.arange(12)) == {1: 0.0, 2: 0.0, 4: 0.0, 8: 0.0}
    # one class: every neighbour is a hit
    assert train_xbm.recall_at_k(emb, torch.zeros(12, dtype=torch.long)) == {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0}


ARGS = ["--dataset", "digits", "--steps", "24", "--batch", "32", "--classes-per-batch", "4", "--memory-size", "128",
        "--start-iteration", "3", "--width", "8", "--embedding-dim", "32", "--seed", "3", "--threads", "1",
        "--no-progress", "--quiet"]


def test_resume_gives_the_uninterrupted_losses(tmp_path):
    full = train_xbm.main(ARGS)
    assert len(full["losses"]) == 24 and all(l > 0 for l in full["losses"])
    ckpt = str(tmp_path / "ck.pt")
    first = train_xbm.main(ARGS + ["--checkpoint", ckpt, "--stop-after", "10"])
    assert first["step"] == 10
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 10
    # 10 steps x 32 rows through a 128-row ring (enqueued from step 3): full and wrapped
    assert int(state["xbm"]["memory.num_filled"]) == 128 and int(state["xbm"]["iteration"]) == 10
    second = train_xbm.main(ARGS + ["--resume", ckpt])
    assert second["step"] == 24
    resumed = first["losses"] + second["losses"]
    mismatch = [(i, a, b) for i, (a, b) in enumerate(zip(full["losses"], resumed)) if a != b]
    assert len(resumed) == 24 and not mismatch, f"first differing steps (step, uninterrupted, resumed): {mismatch[:3]}"
    assert second["recall_after"] == full["recall_after"]


def test_resume_refuses_other_settings(tmp_path):
    ckpt = str(tmp_path / "ck.pt")
    train_xbm.main(ARGS + ["--checkpoint", ckpt, "--stop-after", "2"])
    with pytest.raises(ValueError, match="memory_size"):
        train_xbm.main([a if a != "128" else "256" for a in ARGS] + ["--resume", ckpt])


def test_command_line_prints_recall_before_and_after():
    out = subprocess.run([sys.executable, os.path.join(APP_DIR, "train_xbm.py"), "--dataset", "digits", "--steps", "6",
                          "--batch", "16", "--classes-per-batch", "4", "--memory-size", "64", "--width", "8",
                          "--threads", "1", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Recall@1 before training" in out.stdout and "Recall@1 after training" in out.stdout, out.stdout


def _render_glyphs_in_step(cache_dir, barrier):
    """Child process: renders a small glyph set, all processes writing their cache file at
    the same moment (the barrier holds each one between writing and renaming it)."""
    import numpy as np
    import xbm_data
    save = np.savez_compressed

    def save_then_wait(*args, **kwargs):
        save(*args, **kwargs)
        barrier.wait(timeout=120)
    np.savez_compressed = save_then_wait
    images, labels, _, _ = xbm_data.glyphs(cache_dir, max_classes=12, min_faces=2, quiet=True)
    return int(images.shape[0]), int(labels.sum())


def test_concurrent_first_renders_share_the_glyph_cache(tmp_path):
    """study.py --jobs N and torchrun start several processes on an empty cache: each
    renders and replaces the cache file; none may fail on another's temporary file."""
    import multiprocessing
    import concurrent.futures
    import xbm_data
    if len(xbm_data.find_faces()) < 2:
        pytest.skip("fewer than 2 CJK font faces installed (python/install_data.sh installs them)")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        futures = [ex.submit(_render_glyphs_in_step, str(tmp_path), barrier) for _ in range(2)]
        results = [f.result(timeout=300) for f in futures]
    assert results[0] == results[1] and results[0][0] > 0
    names = [p.name for p in tmp_path.iterdir()]  # one cache file, no temporary left behind
    assert len(names) == 1 and names[0].startswith("glyphs-") and ".tmp" not in names[0], names
    images, labels, _, _ = xbm_data.glyphs(str(tmp_path), max_classes=12, min_faces=2, quiet=True)
    assert (int(images.shape[0]), int(labels.sum())) == results[0]
