"""Shared accuracy checks for op tests (the Cut Cross-Entropy oracle, METHOD.md tolerances)."""
import torch

from signalrl.ops import KERNEL_OF as KERNELS  # noqa: F401  (public op → its forward kernel op; the tests read it here)


def rel_err(got: torch.Tensor, truth: torch.Tensor, floor: float = 1e-6) -> float:
    """‖got − truth‖ / max(‖truth‖, floor·√n) in float64; any NaN/inf in ``got`` → inf.

    The floor keeps quantities that are ~0 in truth (entropy of a one-hot softmax, say) from
    turning harmless absolute differences of 1e-30 into relative error 1."""
    g, t = got.detach().to(truth.device).double(), truth.detach().double()
    assert g.shape == t.shape, (g.shape, t.shape)
    if not torch.isfinite(g).all():
        return float("inf")
    denom = max(t.norm().item(), floor * max(t.numel(), 1) ** 0.5)
    return (g - t).norm().item() / denom


def tol_for(dtype: torch.dtype) -> float:
    return 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2


# Rounding a result to bfloat16/float16 alone costs up to 2^-8 / 2^-11 relative.
_ROUNDING = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def assert_close(what: str, got, truth, dtype, baseline=None, floor: float = 1e-6):
    """fp32: ≲1e-5 relative to float64 truth; bf16/fp16: ≲1e-2, and — given the same-dtype PyTorch
    ``baseline`` — no worse than twice its error (or than rounding the output to that dtype).
    ``floor`` (see :func:`rel_err`) sets the scale below which errors count as absolute."""
    err = rel_err(got, truth, floor)
    tol = tol_for(dtype)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
    if baseline is not None and dtype in _ROUNDING:
        bound = max(2 * rel_err(baseline, truth), _ROUNDING[dtype])
        assert err <= bound, f"{what}: relative error {err:.3e} worse than same-dtype PyTorch bound {bound:.3e}"


def backend_params(kernel: str) -> list:
    """pytest params ``(backend, device)`` for every backend that can run ``kernel`` here: all CPU
    backends (Triton only under the interpreter) plus Triton on CUDA when a GPU is present."""
    import pytest

    from signalrl.ops import available_backends

    params = [pytest.param(b, "cpu", id=f"{b}-cpu") for b in available_backends(kernel, "cpu")]
    if torch.cuda.is_available():
        params += [
            pytest.param(b, "cuda", id=f"{b}-cuda") for b in available_backends(kernel, "cuda") if b != "reference"
        ]
    return params




def break_kernel(monkeypatch, kernel, corrupt) -> None:
    """Make the kernel op ``kernel`` (:class:`signalrl.ops._library.KernelOp`) wrong: every call the op layer makes
    — the op a public function picks (``kernel.op``) and the one a backward calls (``kernel.variant``) — returns
    ``corrupt(args, outputs)``. For check-mode tests: a wrong kernel must be caught."""
    real_op, real_variant = kernel.op, kernel.variant

    def wrap(fn):
        return lambda *args: corrupt(args, fn(*args))

    monkeypatch.setattr(kernel, "op", lambda backend, device: wrap(real_op(backend, device)))
    monkeypatch.setattr(kernel, "variant", lambda name: wrap(real_variant(name)))


# every ratio bound the tests use (1 − clip_low, 1 + clip_high, dual_clip): a float32 ratio within rounding of one is
# clipped by one side and not by the other, a different gradient for that token — not what a test measures
RATIO_BOUNDS = torch.tensor([0.8, 1.2, 1.25, 1.28, 1.3, 1.5, 2.0, 3.0]).log()


def off_ratio_bounds(lp: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``old`` with every log-ratio ``lp − old`` moved at least 1e-5 off :data:`RATIO_BOUNDS` (with 10^4 random tokens
    one lands within 1e-7 of a bound about one run in 1000)."""
    for _ in range(2):
        log_ratio = lp.float() - old.float()
        near = ((log_ratio[..., None] - RATIO_BOUNDS).abs() < 1e-5).any(-1)
        old = torch.where(near, (old.float() + 0.01).to(old.dtype), old)
    return old
