"""Test-wide set-up.

- Without CUDA, Triton kernels run in the interpreter: TRITON_INTERPRET=1 must be set before
  triton is imported, so it is set here, at collection time.
- Tests marked ``gpu`` are skipped without CUDA.
- Outside the kernel/op tests (tests/ops, tests/kernels, tests/gpu), CPU tensors would otherwise
  run through the (slow) Triton interpreter; there the backend is pinned to native when it builds,
  else reference, unless SIGNAL_BACKEND is set explicitly.
"""
import os
import pathlib
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

_KERNEL_DIRS = {"ops", "kernels", "gpu"}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _pin_backend_outside_kernel_tests(request):
    parts = set(pathlib.Path(str(request.node.fspath)).relative_to(pathlib.Path(__file__).parent).parts[:-1])
    if parts & _KERNEL_DIRS or os.environ.get("SIGNAL_BACKEND") or torch.cuda.is_available():
        yield
        return
    from signalrl.ops import use_backend
    from signalrl.ops._backend import native_usable

    with use_backend("native" if native_usable(torch.device("cpu")) else "reference"):
        yield


# Fresh random inputs every run; the seed is printed so a failure can be replayed with SIGNAL_TEST_SEED.
_SEED = int(os.environ.get("SIGNAL_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    return f"signal test seed: SIGNAL_TEST_SEED={_SEED}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # also under -q, which drops the header: a failure is replayed with this seed
    terminalreporter.write_line(f"signal test seed: SIGNAL_TEST_SEED={_SEED}")


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(_SEED + zlib.crc32(request.node.nodeid.encode()))
    yield
