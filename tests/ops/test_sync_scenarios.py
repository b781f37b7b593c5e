"""The scenarios of tests/gpu/test_gpu_no_host_sync.py (every fused op forward and backward) on the CPU backends, so
the GPU-only "no host syncs" test cannot rot between GPU runs (tests/gpu is skipped as a whole without CUDA)."""
import importlib.util
import pathlib

import torch

from signalrl.ops import use_backend
from signalrl.ops._backend import native_usable

_PATH = pathlib.Path(__file__).resolve().parents[1] / "gpu" / "test_gpu_no_host_sync.py"


def _gpu_module():
    spec = importlib.util.spec_from_file_location("_gpu_no_host_sync", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_sync_scenarios_run_on_cpu():
    """On native (or reference): the Triton interpreter would take ~45 s here and is covered by the kernel tests."""
    runs = _gpu_module()._scenarios(torch.device("cpu"))
    assert len(runs) == 9
    with use_backend("native" if native_usable(torch.device("cpu")) else "reference"):
        for fn in runs.values():
            fn()
