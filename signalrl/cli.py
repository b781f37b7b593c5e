"""The ``signal`` command: ``signal demo | tour | bench | serve | keys``."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="signal",
        description="Signal: fused kernels and an RL training API for large language models.",
    )
    parser.add_argument(
        "command", choices=["demo", "tour", "bench", "serve", "keys"],
        help="demo: SFT → reward model → PPO end to end on the embedded tiny model (--remote URL: on a server); "
        "tour: run every op on every backend here and print a table; bench: the kernel benchmark suite; "
        "serve: the engine behind an HTTP API; keys: create | list | revoke the server's API keys",
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    args, rest = parser.parse_known_args(argv[:1])
    rest = argv[1:]
    if args.command == "demo":
        from .demo import main as run
    elif args.command == "tour":
        from .tour import main as run
    elif args.command == "serve":
        from .server.cli import serve as run
    elif args.command == "keys":
        from .server.cli import keys as run
    else:
        from .bench.cli import main as run
    return run(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
