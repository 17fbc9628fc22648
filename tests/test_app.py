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


def test_flag_help_does_not_print_a_misleading_default():
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        train_xbm.parse_args(["--help"])
    help_text = " ".join(buf.getvalue().split())  # argparse wraps lines
    assert "--no-jitter train without the random affine jitter" in help_text, help_text
    assert "(default: True)" not in help_text and "(default: False)" not in help_text
    assert "--lr LR Adam learning rate (default: 0.001)" in help_text  # valued options still show theirs


def test_progress_without_a_terminal_prints_lines_not_a_bar():
    # stdout/stderr are pipes here, as in a log file: no carriage-return bar, a few plain lines
    out = subprocess.run([sys.executable, os.path.join(APP_DIR, "train_xbm.py"), "--dataset", "digits", "--steps", "40",
                          "--batch", "16", "--classes-per-batch", "4", "--memory-size", "64", "--width", "8",
                          "--threads", "1", "--log-every", "2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr + out.stdout
    lines = [l for l in out.stdout.splitlines() if l.startswith("step ")]
    assert [l.split(":")[0] for l in lines] == [f"step {s}/40" for s in range(4, 41, 4)], lines


def test_drift_curve_hand_example():
    # probe set of two points; f_t = f_0 + t * v on a fixed direction: drift at dt is dt^2 |v|^2
    v = torch.tensor([[0.1, 0.0], [0.0, 0.2]])
    snaps = {t: torch.ones(2, 2) + t * v for t in (0, 10, 20, 30, 40)}
    d = train_xbm.drift_curve(snaps, [10, 20, 40, 50], from_step=0)
    per_unit = float((v ** 2).sum(dim=1).mean())  # mean over the probe set of |v|^2 = 0.025
    assert d.keys() == {10, 20, 40}  # no pair 50 steps apart
    for dt in (10, 20, 40):
        assert d[dt] == pytest.approx(dt * dt * per_unit, rel=1e-5), (dt, d[dt])
    # from_step leaves out the pairs that start earlier: only (40, 20) for dt 20
    snaps[40] = snaps[40] + 1.0
    assert train_xbm.drift_curve(snaps, [20], from_step=20)[20] == pytest.approx(
        float(((snaps[40] - snaps[20]) ** 2).sum(dim=1).mean()))
    assert train_xbm.drift_dts(25, 400, memory_age=16384 / 16) == [25, 50, 100, 200, 400]
    assert train_xbm.drift_dts(25, 400, memory_age=4096 / 16) == [25, 50, 100, 200, 250]


def test_fresh_memory_holds_the_current_models_embeddings():
    import xbm_kernels as xk
    torch.manual_seed(0)
    model = train_xbm.EmbeddingNet(32, 8)
    crit = xk.XBMLoss(48, 32, loss="contrastive", start_iteration=1)
    fresh = train_xbm._FreshMemory(crit, chunk=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    seen = []
    for step in range(5):
        x, y = torch.rand(16, 1, 32, 32, generator=g), torch.randint(0, 4, (16,), generator=g)
        ptr, enqueues = int(crit.memory.ptr), fresh.will_enqueue()
        fresh.refresh(model, "cpu")
        loss = crit(model(x), y)
        if enqueues:
            fresh.record(ptr, x)
            seen.append(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert len(crit.memory) == 48 and len(seen) == 4  # 4 batches of 16 through a 48-row ring: wrapped
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    running = [m.running_mean.clone() for m in bn]
    fresh.refresh(model, "cpu")
    assert all(torch.equal(r, m.running_mean) for r, m in zip(running, bn)), "refresh moved BatchNorm statistics"
    # the ring holds batches 2, 3 (slots 16..47) and batch 4 (slots 0..15), each re-embedded by today's model
    with torch.no_grad():
        for m in bn:
            m.momentum = 0.0
        expect = torch.cat([model(seen[3]), model(seen[1]), model(seen[2])])
    assert torch.allclose(crit.memory.embeddings, expect, atol=1e-5)


def test_init_starts_from_the_checkpoints_model(tmp_path):
    ckpt = str(tmp_path / "ck.pt")
    first = train_xbm.main(ARGS + ["--checkpoint", ckpt, "--memory-size", "0"])
    second = train_xbm.main(ARGS[:3] + ["2"] + ARGS[4:] + ["--init", ckpt, "--lr", "0"])
    assert second["recall_before"] == first["recall_after"]  # the loaded weights, not a fresh init
    scratch = train_xbm.main(ARGS[:3] + ["2"] + ARGS[4:])
    assert scratch["recall_before"] != first["recall_after"]


def test_step_log_has_per_step_active_pair_counts(tmp_path):
    log = tmp_path / "steps.csv"
    res = train_xbm.main(ARGS + ["--step-log", str(log)])
    rows = [l.split(",") for l in log.read_text().splitlines()]
    assert rows[0] == ["step", "loss", "in_batch_pos", "in_batch_neg", "memory_pos", "memory_neg"]
    body = rows[1:]
    assert [int(r[0]) for r in body] == list(range(1, 25))
    assert [float(r[1]) for r in body] == pytest.approx(res["losses"], rel=1e-5)
    # the memory joins at step 3 (--start-iteration 3): no memory pairs before, some after
    assert all(int(r[4]) == int(r[5]) == 0 for r in body[:3])
    assert all(int(r[4]) + int(r[5]) > 0 for r in body[3:])
    assert all(int(r[2]) > 0 for r in body)  # 4 classes x 8: every anchor has 7 positives to weigh
    assert [[int(v) for v in r[2:]] for r in body] == res["pairs"]


def test_glyph_split_has_three_disjoint_class_sets(tmp_path):
    import xbm_data
    if len(xbm_data.find_faces()) < 2:
        pytest.skip("fewer than 2 CJK font faces installed (python/install_data.sh installs them)")
    s = xbm_data.load("glyphs", str(tmp_path), test_classes=5, max_classes=20, min_faces=2, pretrain_classes=6,
                      quiet=True)
    sets = [set(t.tolist()) for t in (s.pretrain_labels, s.train_labels, s.test_labels)]
    assert [len(c) for c in sets] == [6, 9, 5]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    with pytest.raises(ValueError, match="pretrain-classes"):
        xbm_data.load("glyphs", str(tmp_path), test_classes=5, max_classes=20, min_faces=2, pretrain_classes=15,
                      quiet=True)


def test_study_smoke_writes_the_table_and_plots(tmp_path):
    import study
    study.main(["--smoke", "--losses", "multi_similarity", "--jobs", "1", "--out-dir", str(tmp_path),
                "--checkpoint", str(tmp_path / "pre.pt")])
    rows = study.read_csv(str(tmp_path / "recall.csv"))
    assert len(rows) == 8  # 2 inits x (batch-only, XBM 64) x 2 seeds
    assert {(r["init"], r["method"]) for r in rows} == {(i, m) for i in ("scratch", "pretrained")
                                                        for m in ("batch-only", "xbm")}
    assert all(0 <= float(r["recall@1"]) <= 1 for r in rows)
    assert {r["init_recall@1"] != "" for r in rows if r["init"] == "pretrained"} == {True}
    drift = study.read_csv(str(tmp_path / "drift.csv"))
    assert {r["seed"] for r in drift} == {"0"} and all(float(r["drift"]) > 0 for r in drift)
    for name in ("recall.md", "recall_vs_memory.png", "drift.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_install_data_reports_what_apt_newly_installed(tmp_path):
    # apt-get, apt-cache, dpkg-query and id stubbed: two of the packages are already installed
    # before, apt installs the rest; the script must count only those.
    state = tmp_path / "installed"
    state.write_text("fonts-vlgothic\nfonts-mona\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "id": 'echo 0',
        "apt-cache": 'exit 0',
        "apt-get": f'if [ "$1" = install ]; then shift; for p in "$@"; do case "$p" in -*) ;; *) echo "$p" >> {state};; '
                   f'esac; done; fi; exit 0',
        "dpkg-query": f'p="${{@: -1}}"; if grep -qx "$p" {state}; then echo "install ok installed"; else exit 1; fi',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    script = os.path.join(APP_DIR, "install_data.sh")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    out = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    total = len(set(state.read_text().split()))
    assert f"{total - 2} package(s) newly installed" in last and "2 of" in last, last
    # run again: everything is there, nothing new
    out = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=60)
    assert "0 package(s) newly installed;" in out.stdout.strip().splitlines()[-1], out.stdout
