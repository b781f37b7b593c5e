"""Each run draws from its own torch RNG stream, so runs sharing a device worker never see each other's draws."""
from __future__ import annotations

import functools

import torch


def own_rng(method):
    """Run ``method`` on the run's own torch RNG stream (CPU generator; on a CUDA run, that device's too)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        saved = torch.random.get_rng_state()
        cuda = self.device.type == "cuda"
        saved_cuda = torch.cuda.get_rng_state(self.device) if cuda else None
        torch.random.set_rng_state(self._rng_state)
        if cuda:
            if self._cuda_rng_state is None:
                torch.cuda.manual_seed(self.config.seed + 29)
            else:
                torch.cuda.set_rng_state(self._cuda_rng_state, self.device)
        ok = False
        try:
            result = method(self, *args, **kwargs)
            ok = True
            return result
        finally:
            if ok:  # a failed request leaves the run's stream where it was, as it leaves everything else
                self._rng_state = torch.random.get_rng_state()
                if cuda:
                    self._cuda_rng_state = torch.cuda.get_rng_state(self.device)
            torch.random.set_rng_state(saved)
            if cuda:
                torch.cuda.set_rng_state(saved_cuda, self.device)
    return wrapper
