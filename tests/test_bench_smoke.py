"""bench/bench.py --smoke runs end to end and writes a usable CSV (CI keeps the benchmark alive)."""
import csv
import glob
import importlib.util
import math
import os
import subprocess
import sys

import xbm_kernels as xk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["device", "torch", "triton", "commit", "date", "op", "provider", "B", "K", "D", "dtype", "mode",
           "ms_median", "ms_p20", "ms_p80", "peak_mem_mb", "tflops", "roofline_frac"]


def _expected_providers():
    provs = {"reference", "paper-loop"}
    if "cpu" in xk.available_backends():
        provs.add("cpu")
    if importlib.util.find_spec("pytorch_metric_learning") is not None:
        provs.add("pml")
    return provs


def _finite_positive(text):
    try:
        v = float(text)
    except ValueError:
        return False
    return math.isfinite(v) and v > 0


def test_bench_smoke(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join("bench", "bench.py"), "--smoke", "--device", "cpu",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bench --smoke exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    csvs = list(tmp_path.glob("*/bench.csv"))
    assert len(csvs) == 1, f"expected one <out>/<device>/bench.csv, found {csvs}"
    with open(csvs[0], newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert rows, "the CSV has no rows"
    for col in ("device", "torch", "commit", "date"):
        assert all(r[col] for r in rows), f"empty {col!r} cells"
    assert not [r for r in rows if r["ms_median"].startswith("ERROR")], "ERROR rows in the smoke run"

    for loss in xk.LOSSES:
        for mode in ("forward", "backward", "full"):
            timed = {r["provider"] for r in rows if r["op"] == loss and r["mode"] == mode
                     and _finite_positive(r["ms_median"]) and _finite_positive(r["ms_p20"])
                     and _finite_positive(r["ms_p80"])}
            if loss == "contrastive":  # the loss every provider implements
                missing = _expected_providers() - timed
                assert not missing, f"{loss}/{mode}: no finite timing for {sorted(missing)}"
            else:
                assert "reference" in timed, f"{loss}/{mode}: reference not timed"
    full = [r for r in rows if r["op"] == "contrastive" and r["mode"] == "full" and _finite_positive(r["ms_median"])]
    assert all(_finite_positive(r["tflops"]) and _finite_positive(r["peak_mem_mb"]) for r in full), \
        "full-mode rows need TFLOP/s and a peak memory"
    enqueued = {r["provider"] for r in rows if r["op"] == "enqueue" and _finite_positive(r["ms_median"])}
    assert {"reference"} <= enqueued, f"enqueue rows: {sorted(enqueued)}"
    assert any(r["op"] == "gemm" and _finite_positive(r["tflops"]) for r in rows), "no GEMM ceiling row"
    if importlib.util.find_spec("matplotlib") is not None:
        assert list(csvs[0].parent.glob("contrastive_*.png")), "no plot written"


def test_bench_pml_smoke(tmp_path):
    """bench/bench_pml.py --smoke: both wrappers timed for every configuration, the fused plan
    recorded."""
    if importlib.util.find_spec("pytorch_metric_learning") is None:
        import pytest
        pytest.skip("pytorch-metric-learning is not installed (python/install.sh installs it)")
    proc = subprocess.run([sys.executable, os.path.join("bench", "bench_pml.py"), "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bench_pml --smoke exited {proc.returncode}\n{proc.stderr[-3000:]}"
    csvs = list(tmp_path.glob("*/bench-pml-smoke.csv"))
    assert len(csvs) == 1, csvs
    with open(csvs[0], newline="") as f:
        rows = list(csv.DictReader(f))
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_pml
    assert [r["config"] for r in rows] == list(bench_pml.CONFIGS)
    for r in rows:
        assert _finite_positive(r["pml_ms"]) and _finite_positive(r["xbm_ms"]) and _finite_positive(r["speedup"])
        assert r["commit"] and r["device"] and r["torch"]
    # the rows named "PML's loss on our memory" are the fallbacks; every other row runs fused
    assert [r["fused"] == "no" for r in rows] == ["PML's loss" in r["config"] for r in rows]


def test_bench_cpu_losses_smoke(tmp_path):
    """bench/bench.py --loss-ratios --smoke (bench_cpu_losses.py): every loss in every configuration
    timed, with its ratio to contrastive and to the GEMM rates."""
    if "cpu" not in xk.available_backends():
        import pytest
        pytest.skip("the CPU kernels are not built")
    proc = subprocess.run([sys.executable, os.path.join("bench", "bench.py"), "--loss-ratios", "--smoke",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bench.py --loss-ratios --smoke exited {proc.returncode}\n{proc.stderr[-3000:]}"
    found = glob.glob(str(tmp_path / "*" / "cpu-losses.csv"))
    assert len(found) == 1, f"expected one cpu-losses.csv under {tmp_path}, found {found}"
    out = found[0]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_cpu_losses
    assert {(r["loss"], r["config"]) for r in rows} == {(l, c) for l in xk.LOSSES for c in bench_cpu_losses.CONFIGS}
    for r in rows:
        assert all(_finite_positive(r[k]) for k in ("median_ms", "x_contrastive", "gemms", "x_fp32"))
        assert r["commit"] and r["device"]


def test_bench_gemm16_smoke(tmp_path):
    """bench/gemm16.py --smoke: every loss with 16-bit products against the fp32 GEMM, timed."""
    if "cpu" not in xk.available_backends():
        import pytest
        pytest.skip("the CPU kernels are not built")
    out = tmp_path / "gemm16.csv"
    proc = subprocess.run([sys.executable, os.path.join("bench", "gemm16.py"), "--smoke", "--csv", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"gemm16 --smoke exited {proc.returncode}\n{proc.stderr[-3000:]}"
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["loss"] for r in rows} == set(xk.LOSSES), rows[:2]


def test_ab_builds_smoke(tmp_path):
    """bench/ab_builds.py against this checkout itself, one small shape: every (shape, dtype,
    loss) row timed on both sides, the ratio their quotient."""
    if "cpu" not in xk.available_backends():
        import pytest
        pytest.skip("the CPU kernels are not built")
    out = tmp_path / "ab.csv"
    proc = subprocess.run([sys.executable, os.path.join("bench", "ab_builds.py"), "--other", ROOT, "--shapes",
                           "16,512,32", "--losses", "contrastive,supcon", "--dtypes", "float32,bfloat16", "--rounds",
                           "1", "--csv", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"ab_builds exited {proc.returncode}\n{proc.stderr[-3000:]}"
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["dtype"], r["loss"]) for r in rows} == {(d, l) for d in ("float32", "bfloat16")
                                                       for l in ("contrastive", "supcon")}
    for r in rows:
        assert _finite_positive(r["other_ms"]) and _finite_positive(r["this_ms"])
        assert abs(float(r["this_over_other"]) - float(r["this_ms"]) / float(r["other_ms"])) < 1e-2
        assert r["this_commit"] == r["other_commit"] and r["device"]
