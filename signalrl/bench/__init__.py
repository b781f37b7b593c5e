"""Signal's kernel benchmark suite (``signal bench``, ``python -m signalrl.bench`` or, in a checkout,
``python -m benchmarks``).

Every public op and every loss, forward / backward / forward+backward, across providers
(reference, torch.compile, native, Triton, peers), with this device's measured ceilings.
:mod:`signalrl.bench.timing` is the one timer and peak-memory meter of every Signal benchmark (the
GPU studies in the checkout's ``benchmarks/`` use it too). See ``benchmarks/README.md`` and
:func:`signalrl.bench.cli.main`.
"""
