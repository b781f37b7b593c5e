"""Packaging hook for the optional ahead-of-time build of the native CPU kernels (csrc/).

Project metadata lives in pyproject.toml. By default nothing is compiled here: signalrl.native
builds the extension just in time on first use. With SIGNAL_BUILD_NATIVE=1 the extension is
built now, as signalrl/_native*.so, and signalrl.native loads it instead:

    SIGNAL_BUILD_NATIVE=1 pip install -e . --no-build-isolation

(--no-build-isolation so the build sees the installed torch; the library is tied to that torch.)

Every built wheel also carries the C++ sources as signalrl/_csrc/, so an installed (non-editable) package
can JIT-build the extension too.
"""
import glob
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


class BuildPyWithSources(build_py):
    """build_py that also copies csrc/ into the built package as signalrl/_csrc/ (read by signalrl.native)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads csrc/ of the checkout
        src_root = os.path.join(HERE, "csrc")
        dst_root = os.path.join(self.build_lib, "signalrl", "_csrc")
        shutil.rmtree(dst_root, ignore_errors=True)  # build/ is reused: a deleted source must not ship
        for dirpath, _, files in os.walk(src_root):
            for name in files:
                if name.endswith(CSRC_SUFFIXES):
                    src = os.path.join(dirpath, name)
                    dst = os.path.join(dst_root, os.path.relpath(src, src_root))
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    shutil.copy2(src, dst)


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
    sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda = sorted(glob.glob("csrc/cuda/*.cu")) if torch.version.cuda and CUDA_HOME else []
    kind = CUDAExtension if cuda else CppExtension
    flags = ["-O3", "-fno-math-errno"] + (["-fopenmp"] if sys.platform.startswith("linux") else [])  # as native.py
    ext = kind(
        "signalrl._native",
        sources + cuda,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": flags, "nvcc": ["-O3"]} if cuda else flags,
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


_native = _native_extension()
_cmdclass = {"build_py": BuildPyWithSources, **_native.pop("cmdclass", {})}
setup(cmdclass=_cmdclass, **_native)
