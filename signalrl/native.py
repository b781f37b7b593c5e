"""Native CPU kernels: builds, loads and exposes the C++ extension in ``csrc/``.

The extension implements the kernel ops ``torch.ops.signalrl.<name>`` for CPU tensors (C++ ATen kernels using
``at::parallel_for``; each ``csrc/cpu/<family>.cpp`` registers its own with ``TORCH_LIBRARY_IMPL(signalrl, CPU)``;
the schemas are the ``torch.library`` ops of :mod:`signalrl.ops`, contract in ``docs/backends.md``). This module finds
or builds it on first use:

1. a prebuilt library next to this file (``signalrl/_native*.so``), made by
   ``SIGNAL_BUILD_NATIVE=1 pip install -e . --no-build-isolation`` and used while it is newer
   than the sources (if it fails to load, e.g. built for another torch, the JIT build is used);
2. otherwise a just-in-time build with :func:`torch.utils.cpp_extension.load` (needs a C++
   compiler and ninja; about a minute on two cores), cached in a subdirectory of :func:`build_dir` named by
   the hash of the sources and flags, and reused by later processes as long as they are unchanged (builds
   of other source versions untouched for a week are removed after a successful build). The sources are
   ``csrc/`` of the checkout, or ``signalrl/_csrc/`` where a wheel was installed (wheels ship them).

Nothing is compiled at import. If the extension cannot be built or loaded, :func:`available`
returns False, a single ``RuntimeWarning`` gives the reason (also in :func:`why`), and the op
layer falls back to the reference implementations. CUDA sources (``csrc/cuda/*.cu``, if any) are
compiled only when torch itself was built with CUDA and nvcc is found.

Environment variables:

- ``SIGNAL_NATIVE=0`` — never build or load the extension (:func:`available` is False).
- ``SIGNAL_NATIVE_BUILD_DIR`` — JIT build/cache directory (default
  ``$XDG_CACHE_HOME/signalrl/native/<torch version>-<python>``, i.e. ``~/.cache/signalrl/...``).
- ``SIGNAL_NATIVE_VERBOSE=1`` — show the compiler output of the JIT build.

Public API: :func:`available`, :func:`load`, :func:`build_dir`, :func:`why`; whether a kernel op has its C++
kernel: :meth:`signalrl.ops._library.KernelOp.implemented_by`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

LIBRARY = "signalrl_native"  # the shared library's name (the ops it implements are in the ``signalrl`` namespace)
NAMESPACE = "signalrl"

_PACKAGE_DIR = Path(__file__).resolve().parent
_SHIPPED_CSRC = _PACKAGE_DIR / "_csrc"  # where setup.py puts the sources in a wheel


def _find_csrc() -> Path:
    """The C++ sources: ``signalrl/_csrc`` in an installed wheel, else ``csrc/`` of the source checkout this
    package lives in (editable installs, running from the repo)."""
    return _SHIPPED_CSRC if (_SHIPPED_CSRC / "cpu").is_dir() else _PACKAGE_DIR.parent / "csrc"


_CSRC = _find_csrc()
# The C++ standard is left to torch.utils.cpp_extension. OpenMP is what at::parallel_for runs on
# in Linux builds of torch; elsewhere the kernels still build, single-threaded.
_CFLAGS = ["-O3", "-fno-math-errno"] + (["-fopenmp"] if sys.platform.startswith("linux") else [])

_lock = threading.RLock()
_loaded_from: str | None = None  # path of the library once loaded
_error: str | None = None  # why the last attempt failed
_warned = False


def enabled() -> bool:
    """False when ``SIGNAL_NATIVE`` is set to 0/false/off/no."""
    return os.environ.get("SIGNAL_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def build_dir() -> Path:
    """Where the JIT build lives: ``$SIGNAL_NATIVE_BUILD_DIR``, else a per-torch cache directory."""
    env = os.environ.get("SIGNAL_NATIVE_BUILD_DIR")
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    return cache / "signalrl" / "native" / tag.replace("+", "_")


def _cuda_sources() -> list[Path]:
    if torch.version.cuda is None or not (_CSRC / "cuda").is_dir():
        return []
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return []
    return sorted((_CSRC / "cuda").glob("*.cu")) + sorted((_CSRC / "cuda").glob("*.cpp"))


def sources() -> list[Path]:
    """The C++ (and, where torch has CUDA, CUDA) sources of the extension."""
    return [*sorted((_CSRC / "cpu").glob("*.cpp")), *_cuda_sources()]


def _all_source_files() -> list[Path]:
    return sorted(p for p in _CSRC.rglob("*") if p.suffix in (".cpp", ".h", ".cu", ".cuh"))


def _fingerprint() -> str:
    h = hashlib.sha256()
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{_CFLAGS}".encode())
    for p in _all_source_files():
        h.update(str(p.relative_to(_CSRC)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _prebuilt() -> Path | None:
    """The library built by setup.py, if present and (in a checkout) not older than the sources."""
    candidates = sorted(_PACKAGE_DIR.glob("_native*.so")) + sorted(_PACKAGE_DIR.glob("_native*.pyd"))
    if not candidates:
        return None
    lib = candidates[0]
    # In a checkout the sources can be edited after the build; sources shipped in a wheel came with the library
    # (and installers give every file the install time, in no useful order).
    if _CSRC.is_dir() and _CSRC != _SHIPPED_CSRC:
        newest = max((p.stat().st_mtime for p in _all_source_files()), default=0.0)
        if lib.stat().st_mtime < newest:
            return None
    return lib


def _ensure_ninja_on_path() -> None:
    if shutil.which("ninja"):
        return
    extra = [Path(sys.executable).parent]
    try:
        import ninja  # the PyPI package ships the binary

        extra.insert(0, Path(ninja.BIN_DIR))
    except ImportError:
        pass
    for d in extra:
        if (d / "ninja").exists():
            os.environ["PATH"] = f"{d}{os.pathsep}{os.environ.get('PATH', '')}"
            return
    raise RuntimeError("ninja is not installed (pip install ninja)")


_STALE_S = 7 * 24 * 3600  # a build of other sources untouched this long is removed after a successful build


def _prune_other_builds(keep: Path) -> None:
    """Remove builds of other source versions that nobody touched for a week (never the one in use)."""
    import time

    for other in keep.parent.iterdir():
        if other == keep or not other.is_dir() or not (other / f"{LIBRARY}.fingerprint").exists():
            continue
        try:
            if time.time() - other.stat().st_mtime > _STALE_S:
                shutil.rmtree(other, ignore_errors=True)
        except OSError:
            pass


def _jit_build() -> str:
    if not _CSRC.is_dir():
        raise RuntimeError(f"the C++ sources are not installed (no {_CSRC})")
    fp = _fingerprint()
    # one directory per source version: ninja rebuilds by file times, so two checkouts (a CI clone beside a working
    # tree, say) sharing one directory would link each other's object files, and concurrent builds would race
    d = build_dir() / fp[:16]
    lib = d / f"{LIBRARY}.so"
    stamp = d / f"{LIBRARY}.fingerprint"
    if lib.exists() and stamp.exists() and stamp.read_text().strip() == fp:
        torch.ops.load_library(str(lib))
        return str(lib)
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler found ({cxx!r} is not on PATH; install g++ or set CXX)")
    _ensure_ninja_on_path()
    from torch.utils import cpp_extension

    d.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)  # other processes take the locked slow path while this builds
    cpp_extension.load(
        name=LIBRARY,
        sources=[str(p) for p in sources()],
        extra_cflags=_CFLAGS,
        extra_include_paths=[str(_CSRC)],
        build_directory=str(d),
        is_python_module=False,
        verbose=os.environ.get("SIGNAL_NATIVE_VERBOSE", "") == "1",
    )
    stamp.write_text(fp)
    _prune_other_builds(d)
    return str(lib)


def _load() -> str:
    prebuilt = _prebuilt()
    if prebuilt is not None:
        try:
            torch.ops.load_library(str(prebuilt))
            return str(prebuilt)
        except OSError as exc:  # built against another torch: rebuild just in time
            warnings.warn(f"signalrl.native: ignoring prebuilt {prebuilt.name} ({exc}); building", RuntimeWarning)
    return _jit_build()


def _registered() -> bool:
    """The library registered CPU kernels for the ``signalrl`` ops (any: which ones is per op,
    :meth:`signalrl.ops._library.KernelOp.implemented_by`)."""
    return any(
        name.startswith(f"{NAMESPACE}::") and torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
        for name in torch._C._dispatch_get_all_op_names()
    )


def _summarize(exc: BaseException) -> str:
    """First line of the error plus the compiler's error lines (a failed build prints pages)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if ": [1/" in first:  # "Error building extension 'x': [1/6] c++ ...": drop the command line
        first = first.split(": [1/")[0]
    head = f"{type(exc).__name__}: {first if len(first) <= 200 else first[:200] + '…'}"
    errors = list(dict.fromkeys(ln for ln in lines[1:] if "error" in ln.lower()))[:5]
    tail = " | ".join(errors)
    hint = " (SIGNAL_NATIVE_VERBOSE=1 shows the full build log)" if len(lines) > 1 else ""
    return head + (f" | {tail}" if tail else "") + hint


def load() -> str:
    """Build (if needed) and load the extension; return the library path. Raises with the reason.

    Unlike :func:`available`, this retries after an earlier failure.
    """
    global _loaded_from, _error
    if not enabled():
        raise RuntimeError("the native extension is disabled by SIGNAL_NATIVE=0")
    with _lock:
        if _loaded_from is not None:
            return _loaded_from
        try:
            path = _load()
            if not _registered():
                raise RuntimeError(f"{path} loaded but registers no CPU kernel of torch.ops.{NAMESPACE}.*")
        except Exception as exc:
            _error = _summarize(exc)
            raise RuntimeError(f"signalrl.native: cannot build or load the extension: {_error}") from exc
        _loaded_from, _error = path, None
        return path


def available() -> bool:
    """True if the extension is (or can now be) built and loaded. Builds it on the first call."""
    global _warned
    if not enabled():
        return False
    if _loaded_from is not None:
        return True
    with _lock:
        if _loaded_from is not None:
            return True
        if _error is not None:
            return False
        try:
            load()
        except RuntimeError:
            if not _warned:
                _warned = True
                warnings.warn(
                    f"signalrl.native: native CPU kernels unavailable ({_error}); "
                    "CPU ops use the reference implementations",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return False
        return True


def why() -> str | None:
    """Why the extension is unavailable (None if it is loaded or was not tried yet)."""
    if not enabled():
        return "disabled by SIGNAL_NATIVE=0"
    return _error


__all__ = ["LIBRARY", "NAMESPACE", "available", "build_dir", "enabled", "load", "sources", "why"]
