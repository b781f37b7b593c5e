"""The checkout's benchmarks: results per device, the GPU check and standalone studies.

The suite itself (``python -m benchmarks`` = ``signal bench``) lives in :mod:`signalrl.bench`, so an
installed wheel has it; this package adds the studies (``api_overhead``, ``remote_overhead``,
``dropin``, ``native_cpu``, ``distributed_scaling``) and the GPU kernel benchmarks (``gpu_*.py``,
run by ``gpu_check.sh``), all timed with :mod:`signalrl.bench.timing`.
"""
