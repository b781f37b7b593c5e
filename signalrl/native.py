"""Native CPU kernels: builds, loads and exposes the C++ extension in ``csrc/``.

The extension registers the operators ``torch.ops.signalrl_native.<name>`` (C++ ATen kernels
using ``at::parallel_for``; schemas in ``csrc/registration.cpp``, contract in
``docs/backends.md``). This module finds or builds it on first use:

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

Public API: :func:`available`, :func:`get`, :func:`load`, :func:`build_dir`, :func:`why`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch

LIBRARY = "signalrl_native"
FUNCTIONS = (
    "token_logprobs_fwd",
    "token_logprobs_bwd",
    "linear_token_logprobs_fwd",
    "linear_token_logprobs_bwd",
    "gae_fwd",
    "ppo_token_fwd",
    "value_loss_fwd",
    "kl_penalty_fwd",
    "kl_penalty_bwd",
    "linear_ppo_fwd",
    "linear_ppo_bwd",
)

_PACKAGE_DIR = Path(__file__).resolve().parent
_SHIPPED_CSRC = _PACKAGE_DIR / "_csrc"  # where setup.py puts the sources in a wheel


def _find_csrc() -> Path:
    """The C++ sources: ``signalrl/_csrc`` in an installed wheel, else ``csrc/`` of the source checkout this
    package lives in (editable installs, running from the repo)."""
    return _SHIPPED_CSRC if (_SHIPPED_CSRC / "registration.cpp").is_file() else _PACKAGE_DIR.parent / "csrc"


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
    return [_CSRC / "registration.cpp", *sorted((_CSRC / "cpu").glob("*.cpp")), *_cuda_sources()]


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
    try:
        ns = getattr(torch.ops, LIBRARY)
        return all(hasattr(ns, name) for name in FUNCTIONS)
    except (AttributeError, RuntimeError):
        return False


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
                raise RuntimeError(f"{path} loaded but does not register torch.ops.{LIBRARY}.*")
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


# ---- kernel functions (signatures of docs/backends.md) ----------------------------------------



def _empty_like(ref: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(0, dtype=torch.float32, device=ref.device) if t is None else t


def _ops():
    return getattr(torch.ops, LIBRARY)


def token_logprobs_fwd(logits, targets, temperature, ignore_index, with_entropy):
    """logits [N, V] f32|bf16|f16, targets [N] int64 → (logprobs [N] f32, entropy [N] f32 | empty, lse [N] f64)."""
    return _ops().token_logprobs_fwd(logits, targets, float(temperature), int(ignore_index), bool(with_entropy))


def token_logprobs_bwd(grad_logprobs, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index):
    """→ grad_logits [N, V] in logits.dtype (grad_entropy empty/None ⇒ no entropy term)."""
    return _ops().token_logprobs_bwd(
        grad_logprobs, _empty_like(logits, grad_entropy), logits, targets, lse,
        _empty_like(logits, entropy), float(temperature), int(ignore_index),
    )


def linear_token_logprobs_fwd(hidden, weight, bias, targets, temperature, ignore_index, with_entropy):
    """hidden [N, H], weight [V, H], bias [V] | None, targets [N] → (logprobs, entropy | empty f32, lse f64)."""
    return _ops().linear_token_logprobs_fwd(
        hidden, weight, bias, targets, float(temperature), int(ignore_index), bool(with_entropy)
    )


def linear_token_logprobs_bwd(grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy,
                              temperature, ignore_index, need_hidden, need_weight, need_bias):
    """→ (grad_hidden [N, H] | empty, grad_weight [V, H] | empty, grad_bias [V] | empty)."""
    return _ops().linear_token_logprobs_bwd(
        grad_logprobs, _empty_like(hidden, grad_entropy), hidden, weight, bias, targets, lse,
        _empty_like(hidden, entropy), float(temperature), int(ignore_index),
        bool(need_hidden), bool(need_weight), bool(need_bias) and bias is not None,
    )


def gae_fwd(rewards, values, mask, last_values, gamma, lam):
    """rewards, values, mask [B, T] f32, last_values [B] f32 → (advantages, returns) [B, T] f32."""
    return _ops().gae_fwd(rewards, values, mask, last_values, float(gamma), float(lam))


def _opt_vec(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None or t.numel() == 0 else t


def _opt_float(x) -> float | None:
    return None if x is None else float(x)


def ppo_token_fwd(logprobs, old_logprobs, advantages, weights, mask, ref_logprobs, entropy, clip_low, clip_high,
                  dual_clip, kl_estimator, kl_coef, entropy_coef, log_ratio_clamp=None):
    """[N] vectors (float, read as f32) → (loss [] f32, grad_logprobs [N] f32, grad_entropy [N] f32 | empty,
    stats [9] f32); ref_logprobs / entropy None or empty when absent."""
    return _ops().ppo_token_fwd(
        logprobs, old_logprobs, advantages, weights, mask, _opt_vec(ref_logprobs), _opt_vec(entropy),
        float(clip_low), float(clip_high), _opt_float(dual_clip), str(kl_estimator),
        float(kl_coef), float(entropy_coef), _opt_float(log_ratio_clamp),
    )


def value_loss_fwd(values, old_values, returns, weights, mask, clip):
    """[N] vectors → (loss [] f32, grad_values [N] f32, stats [4] f32)."""
    return _ops().value_loss_fwd(values, old_values, returns, weights, mask, None if clip is None else float(clip))


def kl_penalty_fwd(logprobs, ref_logprobs, estimator):
    """[N] → kl [N] f32."""
    return _ops().kl_penalty_fwd(logprobs, ref_logprobs, str(estimator))


def kl_penalty_bwd(grad_kl, logprobs, ref_logprobs, estimator):
    """→ grad_logprobs [N] f32 (the gradient of ref_logprobs is its negation)."""
    return _ops().kl_penalty_bwd(grad_kl, logprobs, ref_logprobs, str(estimator))


def linear_ppo_fwd(hidden, weight, bias, targets, old_logprobs, advantages, weights, mask, ref_logprobs,
                   temperature, ignore_index, clip_low, clip_high, dual_clip, kl_estimator, kl_coef, entropy_coef,
                   log_ratio_clamp=None):
    """→ (loss [] f32, stats [9] f32, logprobs, entropy, lse, g_lp [N] f32, g_ent [N] f32 | empty)."""
    return _ops().linear_ppo_fwd(
        hidden, weight, bias, targets, old_logprobs, advantages, weights, mask, _opt_vec(ref_logprobs),
        float(temperature), int(ignore_index), float(clip_low), float(clip_high),
        _opt_float(dual_clip), str(kl_estimator), float(kl_coef), float(entropy_coef), _opt_float(log_ratio_clamp),
    )


def linear_ppo_bwd(grad_loss, g_lp, g_ent, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index,
                   need_hidden, need_weight, need_bias):
    """→ (grad_hidden | empty, grad_weight | empty, grad_bias | empty)."""
    return _ops().linear_ppo_bwd(
        grad_loss, g_lp, _empty_like(hidden, g_ent), hidden, weight, bias, targets, lse,
        _empty_like(hidden, entropy), float(temperature), int(ignore_index),
        bool(need_hidden), bool(need_weight), bool(need_bias) and bias is not None,
    )


_FUNCTIONS: dict[str, Callable] = {
    "token_logprobs_fwd": token_logprobs_fwd,
    "token_logprobs_bwd": token_logprobs_bwd,
    "linear_token_logprobs_fwd": linear_token_logprobs_fwd,
    "linear_token_logprobs_bwd": linear_token_logprobs_bwd,
    "gae_fwd": gae_fwd,
    "ppo_token_fwd": ppo_token_fwd,
    "value_loss_fwd": value_loss_fwd,
    "kl_penalty_fwd": kl_penalty_fwd,
    "kl_penalty_bwd": kl_penalty_bwd,
    "linear_ppo_fwd": linear_ppo_fwd,
    "linear_ppo_bwd": linear_ppo_bwd,
}


def get(name: str) -> Callable | None:
    """The kernel function ``name`` (signature as in docs/backends.md), or None if the extension
    does not provide it or cannot be built/loaded here."""
    fn = _FUNCTIONS.get(name)
    if fn is None or not available():
        return None
    return fn


__all__ = ["FUNCTIONS", "LIBRARY", "available", "build_dir", "enabled", "get", "load", "sources", "why"]
