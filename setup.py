"""Packaging hook for the optional ahead-of-time build of the native CPU kernels (csrc/).

Project metadata lives in pyproject.toml. By default nothing is compiled here: signalrl.native
builds the extension just in time on first use. With SIGNAL_BUILD_NATIVE=1 the extension is
built now, as signalrl/_native*.so, and signalrl.native loads it instead:

    SIGNAL_BUILD_NATIVE=1 pip install -e . --no-build-isolation

(--no-build-isolation so the build sees the installed torch; the library is tied to that torch.)
"""
import glob
import os
import sys

from setuptools import setup


def _native_extension() -> dict:
    if os.environ.get("SIGNAL_BUILD_NATIVE", "").strip().lower() not in ("1", "true", "yes", "on"):
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        raise RuntimeError(
            "SIGNAL_BUILD_NATIVE=1 needs torch in the build environment: "
            "run pip with --no-build-isolation"
        ) from exc
    here = os.path.dirname(os.path.abspath(__file__))
    sources = ["csrc/registration.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cuda = sorted(glob.glob("csrc/cuda/*.cu")) if torch.version.cuda and CUDA_HOME else []
    kind = CUDAExtension if cuda else CppExtension
    flags = ["-O3", "-fno-math-errno"] + (["-fopenmp"] if sys.platform.startswith("linux") else [])  # as native.py
    ext = kind(
        "signalrl._native",
        sources + cuda,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": flags, "nvcc": ["-O3"]} if cuda else flags,
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_native_extension())
