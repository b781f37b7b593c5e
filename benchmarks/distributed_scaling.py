"""Sharded-run scaling on this machine: time per step (forward_backward + optim_step) and peak memory per rank,
same global batch, 1 process (plain Run) vs N ranks (ShardedRun, FSDP2).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/distributed_scaling.py [--steps 5]
    OMP_NUM_THREADS=1 python benchmarks/distributed_scaling.py            # the 1-process baseline

Prints one line per rank: world size, rank, seconds per step (median), peak RSS (MiB).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402

from signalrl.engine.config import RunConfig  # noqa: E402
from signalrl.engine.models import load_base_model  # noqa: E402
from signalrl.engine.frozen_models import ReferenceCache  # noqa: E402


def batch(n: int, length: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"prompt": torch.randint(3, 250, (8,), generator=g).tolist(),
             "response": torch.randint(3, 250, (length,), generator=g).tolist()} for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=120)
    ap.add_argument("--model", default="signal-tiny")
    ap.add_argument("--lora-r", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    cfg = RunConfig(base_model=args.model, lora_r=args.lora_r, learning_rate=1e-4)
    cache = ReferenceCache(lambda name, **kw: load_base_model(name, arg="reference_model", **kw)[0], capacity=1)
    root = tempfile.mkdtemp()
    if "WORLD_SIZE" in os.environ:
        from signalrl.distributed import comm as dcomm
        from signalrl.distributed.run import ShardedRun

        comm = dcomm.init(backend="gloo")
        run = ShardedRun("bench", cfg, comm=comm, run_dir=os.path.join(root, "bench"), reference_cache=cache,
                         device="cpu")
        world, rank = comm.world_size, comm.rank
    else:
        from signalrl.engine.run import Run

        run = Run("bench", cfg, run_dir=os.path.join(root, "bench"), reference_cache=cache, device="cpu")
        world, rank = 1, 0
    data = batch(args.batch, args.length)
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        run.forward_backward(data, "causal_lm")
        run.optim_step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"world {world} rank {rank}: {statistics.median(times):.3f} s/step (median of {args.steps}), "
          f"peak RSS {peak:.0f} MiB, model {args.model}, lora_r {args.lora_r}, global batch {args.batch}x"
          f"{args.length + 8} tokens", flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
