"""Op-layer call overhead, side by side for two checkouts: median CPU µs per call of every public op (forward and
backward where it has one) on the native backend at tiny shapes, where the Python and dispatcher overhead is most of
the call. Each checkout runs in its own process (``PYTHONPATH=<checkout>``), alternating, ``--rounds`` times; the
figure is per-process CPU time (``time.process_time``, one thread), which a busy machine disturbs far less than wall
time.

    python benchmarks/oplayer_overhead.py --before ../signal-before --after . [--rounds 5] [--out FILE.md]

Without ``--before``/``--after`` it measures this checkout once and prints JSON (what the alternation runs).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time

OPS = ("token_logprobs", "linear_token_logprobs", "clipped_surrogate", "value_loss", "kl_penalty", "gae",
       "linear_ppo_loss")


def _calls():
    import torch

    import signalrl.ops as ops

    torch.manual_seed(0)
    B, T, V, H = 2, 8, 64, 16
    lp = torch.randn(B, T) - 2
    old, adv, ref = lp + 0.1 * torch.randn(B, T), torch.randn(B, T), lp + 0.1 * torch.randn(B, T)
    mask = (torch.rand(B, T) > 0.2).float()
    logits, tgt = torch.randn(B * T, V), torch.randint(0, V, (B * T,))
    hidden, weight, tgt2 = torch.randn(B, T, H), torch.randn(V, H) / 4, torch.randint(0, V, (B, T))

    def leaf(x):
        return x.clone().requires_grad_()

    x_logits, x_hidden, x_lp, x_v, x_kl, x_lin = (leaf(t) for t in (logits, hidden, lp, lp, lp, hidden))
    return ops, {
        "token_logprobs": lambda: ops.token_logprobs(x_logits, tgt).sum().backward(),
        "linear_token_logprobs": lambda: ops.linear_token_logprobs(x_hidden, weight, tgt2).sum().backward(),
        "clipped_surrogate": lambda: ops.clipped_surrogate(x_lp, old, adv, mask)[0].backward(),
        "value_loss": lambda: ops.value_loss(x_v, old, adv, mask, clip=0.2)[0].backward(),
        "kl_penalty": lambda: ops.kl_penalty(x_kl, ref).sum().backward(),
        "gae": lambda: ops.gae(adv, old, mask),
        "linear_ppo_loss": lambda: ops.linear_ppo_loss(x_lin, weight, tgt2, old, adv, mask)[0].backward(),
    }


def measure(reps: int = 15, inner: int = 100) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    ops, calls = _calls()
    out = {}
    with ops.use_backend("native"):
        for fn in calls.values():
            for _ in range(50):
                fn()
        for name, fn in calls.items():
            times = []
            for _ in range(reps):
                t = time.process_time()
                for _ in range(inner):
                    fn()
                times.append((time.process_time() - t) / inner * 1e6)
            out[name] = statistics.median(times)
    return out


def _run(checkout: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=900, cwd=os.path.abspath(checkout))
    if proc.returncode:
        raise RuntimeError(f"{checkout}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before")
    p.add_argument("--after")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out")
    args = p.parse_args()
    if not (args.before and args.after):
        print(json.dumps(measure()))
        return 0
    runs = {"before": [], "after": []}
    for _ in range(args.rounds):
        for side in ("before", "after"):
            runs[side].append(_run(getattr(args, side)))
    med = {s: {op: statistics.median(r[op] for r in rs) for op in OPS} for s, rs in runs.items()}
    lines = [
        "# Op-layer call overhead: before vs after (native backend, tiny shapes)",
        "",
        f"Command: `python benchmarks/oplayer_overhead.py --before {args.before} --after {args.after} "
        f"--rounds {args.rounds}`  ",
        f"Date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs; one thread per "
        "process; CPU µs per call (median of 15 × 100 calls per process, median over the rounds); the two checkouts "
        "alternate process by process.",
        "",
        "| op (forward + backward) | before µs | after µs | after / before |",
        "|---|---:|---:|---:|",
    ]
    for op in OPS:
        b, a = med["before"][op], med["after"][op]
        lines.append(f"| {op} | {b:.0f} | {a:.0f} | {a / b:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
