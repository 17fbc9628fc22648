"""Build xbm_kernels._C: the C++ CPU kernels always, the CUDA kernels when nvcc and a CUDA
build of torch are both present.

Knobs (environment):
  FORCE_CUDA=1          build the CUDA sources even if torch reports no CUDA build
  FORCE_ONLY_CPU=1      never build the CUDA sources
  TORCH_CUDA_ARCH_LIST  CUDA architectures (default "8.0;9.0a")
  MAX_JOBS              parallel compile jobs (read by torch's ninja builder)

Install with `pip install --no-build-isolation .`: the extension is compiled against the
torch that is installed, and torch is deliberately not a build requirement (pip's isolated
build environment would have none, or a different one). The wheel's metadata pins
torch==<major.minor>.* of the torch it was built with, since the C++ ABI changes between
torch minor versions.
"""
import glob
import os
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

NO_TORCH = """xbm_kernels build: torch is not importable here. The C++ extension is compiled against
the torch you run, so torch must be installed first and the build must see it:

    pip install torch==<version>            # the torch you will run, e.g. torch==2.13.0
    pip install --no-build-isolation .      # (or -e . ; pip wheel --no-build-isolation .)

Without --no-build-isolation pip builds in a fresh environment that has no torch.
"""


def torch_requirement(version):
    """The install requirement for the torch a build used: the same major.minor release
    (torch's C++ ABI is not stable across minor versions; patch releases keep it)."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise ValueError(f"torch version {version!r}: expected major.minor[...]")
    return f"torch=={m.group(1)}.{m.group(2)}.*"


def _import_torch():
    try:
        import torch
    except ImportError:
        sys.exit(NO_TORCH)
    return torch


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _decide_cuda(torch, CUDA_HOME):
    if _flag("FORCE_ONLY_CPU"):
        return False, "FORCE_ONLY_CPU is set"
    if _flag("FORCE_CUDA"):
        return True, "FORCE_CUDA is set"
    if torch.version.cuda is None:
        return False, "torch %s is not a CUDA build" % torch.__version__
    if CUDA_HOME is None:
        return False, "nvcc / CUDA_HOME not found"
    return True, "torch %s (CUDA %s) and CUDA_HOME=%s" % (torch.__version__, torch.version.cuda, CUDA_HOME)


def _extension(torch):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension, CUDA_HOME
    with_cuda, why = _decide_cuda(torch, CUDA_HOME)
    sources = [os.path.relpath(p, ROOT) for p in
               sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
               + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    # -ffp-contract=off: the epilogues' AVX2 / AVX-512 versions (csrc/cpu/simd.h) compute every
    # lane exactly as the 4-lane build does; a fused multiply-add would move exp(S / tau - m) off
    # 1 at the row maximum, where supcon's rule needs exactly 1.
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"] if sys.platform != "win32" else ["/O2"]
    extra = {"cxx": cxx}
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
        extra["nvcc"] = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        ext_cls = CUDAExtension
    else:
        ext_cls = CppExtension
    print("xbm_kernels build: CUDA %s (%s); arch list %s; MAX_JOBS=%s; %d sources" % (
        "ON" if with_cuda else "OFF", why, os.environ.get("TORCH_CUDA_ARCH_LIST", "-") if with_cuda else "-",
        os.environ.get("MAX_JOBS", "default"), len(sources)))
    return ext_cls("xbm_kernels._C", sources, extra_compile_args=extra, define_macros=define_macros,
                   include_dirs=[os.path.join(ROOT, "csrc")],
                   extra_link_args=["-fopenmp"] if sys.platform != "win32" else [],
                   py_limited_api=True)



def main():
    torch = _import_torch()
    from torch.utils.cpp_extension import BuildExtension
    requirement = torch_requirement(torch.__version__)
    print("xbm_kernels build: against torch %s; the package requires %s" % (torch.__version__, requirement))
    setup(
        name="xbm-kernels",
        version="0.1.0",
        description="Fused Cross-Batch Memory (XBM) losses for PyTorch: reference, C++ CPU, Triton and CUDA backends",
        long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
        long_description_content_type="text/markdown",
        author="The xbm-kernels authors",
        license="MIT",
        license_files=["LICENSE"],
        keywords=["metric learning", "cross-batch memory", "pytorch", "triton", "cuda"],
        classifiers=[
            "Programming Language :: Python :: 3",
            "Programming Language :: C++",
            "Topic :: Scientific/Engineering :: Artificial Intelligence",
        ],
        packages=find_packages(include=["xbm_kernels", "xbm_kernels.*"]),
        package_data={"xbm_kernels": ["CONTRACT.md"]},
        python_requires=">=3.10",
        install_requires=[requirement, "numpy"],
        extras_require={
            "triton": ["triton>=3.6"],
            "test": ["pytest", "hypothesis"],
            "app": ["tqdm", "scikit-learn", "matplotlib", "pillow"],
        },
        ext_modules=[_extension(torch)],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        options={"bdist_wheel": {"py_limited_api": "cp39"}},
        zip_safe=False,
    )


if __name__ == "__main__":  # also how setuptools' build backend runs this file
    main()
