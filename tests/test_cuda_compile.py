"""Compile-only check of csrc/cuda/*.cu for sm_80 and sm_90a (CONTRACT.md section 6).

CI has no GPU and a CPU build of torch, so the CUDA sources are compiled with nvcc against
the installed torch headers, with the flags a real CUDAExtension build uses, and nothing is
linked. Two headers of a CUDA torch build are missing from a CPU wheel: the sources include
c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h, and the CMake-generated
c10/cuda/impl/cuda_cmake_macros.h is shimmed in a temporary include directory. Skipped only
when nvcc is not on PATH.
"""
import concurrent.futures
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
ARCHS = {
    "sm_80": "-gencode=arch=compute_80,code=sm_80",
    "sm_90a": "-gencode=arch=compute_90a,code=sm_90a",
}
NVCC = shutil.which("nvcc")
TIMEOUT_S = 600

# slow: two minutes of nvcc on a 2-core machine; CI runs it in its `-m slow` pass (.ci/run)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH: CUDA sources not compile-checked")]

# What CMake generates for a CUDA build of torch (c10/cuda/impl/cuda_cmake_macros.h.in).
CMAKE_MACROS_SHIM = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def _nvcc_flags(shim_dir):
    """The flags torch's BuildExtension passes for setup.py's CUDAExtension (-c only)."""
    from torch.utils import cpp_extension

    includes = [shim_dir, os.path.join(ROOT, "csrc")] + cpp_extension.include_paths() + \
        [sysconfig.get_paths()["include"]]
    return (list(cpp_extension.COMMON_NVCC_FLAGS)
            + ["--compiler-options", "-fPIC"]
            + ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]  # setup.py's nvcc flags
            + ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-DPy_LIMITED_API=0x03090000"]
            + ["-I" + d for d in includes])


def _compile(job):
    src, arch, flags, out_dir = job
    out = os.path.join(out_dir, "%s.%s.o" % (os.path.basename(src), arch))
    cmd = [NVCC, "-c", src, "-o", out, ARCHS[arch]] + flags
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return (src, arch), (False, "nvcc timed out after %d s" % TIMEOUT_S)
    ok = proc.returncode == 0 and os.path.exists(out)
    return (src, arch), (ok, "$ %s\n%s%s" % (" ".join(cmd), proc.stdout, proc.stderr))


@pytest.fixture(scope="module")
def nvcc_flags(tmp_path_factory):
    shim_dir = tmp_path_factory.mktemp("cuda_include")
    (shim_dir / "c10" / "cuda" / "impl").mkdir(parents=True)
    (shim_dir / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(CMAKE_MACROS_SHIM)
    return _nvcc_flags(str(shim_dir))


def test_cuda_sources_present():
    assert SOURCES, "no csrc/cuda/*.cu sources found"


@pytest.mark.parametrize("src", SOURCES, ids=[os.path.basename(s) for s in SOURCES])
def test_cuda_source_compiles(nvcc_flags, src, tmp_path):
    """One source for every arch, the archs in parallel."""
    jobs = [(src, arch, nvcc_flags, str(tmp_path)) for arch in sorted(ARCHS)]
    workers = max(1, min(len(jobs), os.cpu_count() or 2))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        results = dict(pool.map(_compile, jobs))
    failed = [(arch, log) for (_, arch), (ok, log) in sorted(results.items()) if not ok]
    assert not failed, "\n\n".join("nvcc failed for %s (%s):\n%s" % (os.path.relpath(src, ROOT), arch, log[-8000:])
                                    for arch, log in failed)
