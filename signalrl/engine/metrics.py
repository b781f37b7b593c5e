"""Per-run metrics: one JSON object per line in ``<run_dir>/metrics.jsonl`` (+ TensorBoard if installed)."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class MetricsWriter:
    def __init__(self, path: str, tensorboard: bool = False):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

                self._tb = SummaryWriter(os.path.join(os.path.dirname(path), "tensorboard"))
            except Exception:  # noqa: BLE001 - optional
                self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": time.time(), **record}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
        if self._tb is not None:
            step = int(record.get("step", 0))
            op = record.get("op", "op")
            for key, val in record.items():
                if isinstance(val, (int, float)) and not isinstance(val, bool) and key not in ("time", "step"):
                    self._tb.add_scalar(f"{op}/{key}", val, step)
            for key, val in (record.get("metrics") or {}).items():
                if isinstance(val, (int, float)):
                    self._tb.add_scalar(f"{op}/{key}", val, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
