"""Signal's kernel benchmark suite (``python -m benchmarks`` or ``signal bench``).

Every public op and every loss, forward / backward / forward+backward, across providers
(reference, torch.compile, native, Triton, peers), with this device's measured ceilings.
See ``benchmarks/README.md`` and :func:`benchmarks.cli.main`.
"""
