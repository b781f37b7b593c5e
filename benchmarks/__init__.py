"""The checkout's benchmarks: results per device, the GPU check and standalone studies.

The suite itself (``python -m benchmarks`` = ``signal bench``) lives in :mod:`signalrl.bench`, so an
installed wheel has it; this package adds the studies (``api_overhead``, ``remote_overhead``,
``remote_demo``, ``dropin``, ``native_cpu``, ``distributed_scaling``) and the GPU kernel benchmarks (``gpu_*.py``,
run by ``gpu_check.sh``), all timed with :mod:`signalrl.bench.timing`.
"""
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def save_study(text: str, out: str | None, default_name: str, quick: bool = False) -> None:
    """Write a study's markdown to ``out``, else to ``results/<default_name>``. A quick (smoke) run writes only
    to an ``out`` it was given, so it never replaces a committed result."""
    if quick and not out:
        return
    path = out or os.path.join(RESULTS, default_name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {path}")
