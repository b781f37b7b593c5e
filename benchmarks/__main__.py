"""``python -m benchmarks ARGS`` = ``signal bench ARGS``: the suite in :mod:`signalrl.bench`."""
from signalrl.bench.cli import main

raise SystemExit(main())
