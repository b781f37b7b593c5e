import torch


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64 (ground-truth runs), else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
