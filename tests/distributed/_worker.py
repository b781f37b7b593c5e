"""One rank of a distributed test job (launched by tests/distributed/test_sharded.py, or by hand with
``torchrun --standalone --nproc-per-node N tests/distributed/_worker.py <mode> <out.json> <root_dir>``).

``parity``: every loss × LoRA/full fine-tuning × two accumulated forward_backward calls + optim_step, compared
with a one-process :class:`Run` on the same global batch (rank 0 runs it); NaN on one rank; checkpoints 2 → 1 and
1 → N; sampling; the engine driven by the usual client. ``kill``/``hang``: rank 1 dies/hangs mid-request.
Rank 0 writes its findings to ``out.json``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

torch.set_num_threads(1)

from signalrl.distributed import comm as dcomm  # noqa: E402
from signalrl.distributed.engine import ShardedEngine, follow  # noqa: E402
from signalrl.distributed.run import ShardedRun, _local  # noqa: E402
from signalrl.engine.engine import Engine  # noqa: E402
from signalrl.engine.run import Run  # noqa: E402

ALL_LOSSES = ["causal_lm", "enhanced_ppo", "conservative_ppo", "grpo", "dpo", "reward_modeling", "importance_sampling"]
LOSSES = os.environ.get("SIGNAL_TEST_LOSSES", ",".join(ALL_LOSSES)).split(",")


def toks(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (n,), generator=g).tolist()


def batches(loss: str, which: int) -> list[dict]:
    """Global batches with different lengths per example (so ranks get different token counts)."""
    s = 1000 * which + 17 * ALL_LOSSES.index(loss)
    lens = [(2 + (i * 3 + which) % 5, 1 + (i * 5 + which) % 7) for i in range(5)]  # (prompt, response) lengths
    if loss == "causal_lm":
        return [{"prompt": toks(s + i, p), "response": toks(s + 50 + i, r)} for i, (p, r) in enumerate(lens)]
    if loss in ("enhanced_ppo", "conservative_ppo"):
        return [{"prompt": toks(s + i, p), "response": toks(s + 50 + i, r),
                 "old_log_probs": [-5.5 + 0.1 * ((i + j) % 3) for j in range(r)], "rewards": float((i % 3) - 1)}
                for i, (p, r) in enumerate(lens)]
    if loss == "grpo":
        return [{"prompt": toks(s + i, p), "responses": [toks(s + 50 + i + 7 * j, 1 + (r + j) % 5) for j in range(3)],
                 "rewards": [float(i % 2), 1.0, 0.5 * i]} for i, (p, r) in enumerate(lens[:3])]
    if loss in ("dpo", "reward_modeling"):
        return [{"prompt": toks(s + i, p), "chosen": toks(s + 50 + i, r), "rejected": toks(s + 80 + i, 1 + (r + 2) % 6)}
                for i, (p, r) in enumerate(lens)]
    if loss == "importance_sampling":
        return [{"prompt": toks(s + i, p), "response": toks(s + 50 + i, r), "behavior_log_probs": -5.0 * r,
                 "rewards": float(i % 2)} for i, (p, r) in enumerate(lens)]
    raise ValueError(loss)


KWARGS = {"conservative_ppo": None, "dpo": None, "grpo": {"beta": 0.01}}


def rel(a: float, b: float) -> float:
    """|a − b| / max(|b|, 1): relative for values ≥ 1, absolute below (a GRPO loss ≈ 1e-8, a policy loss of
    5e-3, are sums of O(1) terms that cancel: their rounding is that of the terms)."""
    return abs(a - b) / max(abs(b), 1.0)


def dict_rel(a: dict, b: dict) -> float:
    """max |a − b| over every tensor, over the largest |b| of all of them (the model's scale: a structurally
    zero gradient, such as a Bradley–Terry reward bias, is compared on that scale, not its own)."""
    if set(a) != set(b):
        return math.inf
    scale = max(float(t.double().abs().max()) for t in b.values())
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in b) / max(scale, 1e-30)


def snapshot(run) -> dict:
    """This rank's whole mutable state (local shards), bit for bit."""
    out = {}
    for n, p in run.trainable_parameters():
        out["p." + n] = _local(p.detach()).clone()
        out["g." + n] = None if p.grad is None else _local(p.grad).clone()
    for pid, st in run.optimizer.state_dict()["state"].items():
        for k, v in st.items():
            out[f"o.{pid}.{k}"] = _local(v).clone() if torch.is_tensor(v) else v
    out["step"], out["pending"], out["heads"] = run.step, run.pending_grads, list(run.heads)
    return out


def same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if torch.is_tensor(x):
            if not (torch.is_tensor(y) and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def inject(run, mode: str):
    """Make this rank's root produce NaN log-probs (``value``) or NaN gradients (``grad``)."""
    root = run._root
    orig = root.forward

    def forward(kind, *a, **kw):
        out = orig(kind, *a, **kw)
        if kind == "policy":
            lp = out[0] * float("nan") if mode == "value" else _NanGrad.apply(out[0])
            return (lp, *out[1:])
        return out
    root.forward = forward
    return lambda: setattr(root, "forward", orig)


def parity(comm, out_path: str, root: str) -> None:
    rank, ws = comm.rank, comm.world_size
    report: dict = {"world_size": ws, "rows": [], "checks": {}, "errors": []}
    t_start = time.time()

    def check(name, ok, detail=""):
        report["checks"][name] = {"ok": bool(ok), "detail": detail}

    for lora_r, opt in ((4, "adamw"), (0, "sgd")):
        cfg = dict(base_model="signal-tiny", lora_r=lora_r, learning_rate=1e-2, seed=3, max_grad_norm=0.5,
                   optimizer=opt, momentum=0.9 if opt == "sgd" else 0.0)
        from signalrl.engine.config import RunConfig
        from signalrl.engine.reference import ReferenceCache
        from signalrl.engine.models import load_base_model

        cache = ReferenceCache(lambda name, **kw: load_base_model(name, arg="reference_model", **kw)[0], capacity=2)
        # an uneven split in the 3-rank job: rank 2 takes the most rows (and one rank may take none)
        split = None if ws == 2 else (lambda n: [n // 5, n // 3, n - n // 5 - n // 3])
        sr = ShardedRun(f"s{lora_r}", RunConfig(**cfg), comm=comm, run_dir=os.path.join(root, f"s{lora_r}"),
                        reference_cache=cache, device="cpu", split=split)
        ref = Run(f"r{lora_r}", RunConfig(**cfg), run_dir=os.path.join(root, f"r{lora_r}-{rank}"),
                  reference_cache=cache, device="cpu") if rank == 0 else None
        for loss in LOSSES:
            kw = KWARGS.get(loss)
            row = {"loss": loss, "lora": bool(lora_r), "optimizer": cfg["optimizer"], "world_size": ws,
                   "metrics_rel": 0.0}
            for which in (0, 1):  # two accumulated forward_backward calls
                b = batches(loss, which)
                got = sr.forward_backward(b, loss, kw)
                if rank == 0:
                    want = ref.forward_backward(b, loss, kw)
                    diffs = {"loss": rel(got.loss, want.loss), **{k: rel(got.metrics[k], want.metrics[k])
                                                                  for k in want.metrics}}
                    d = max(diffs.values())
                    worst = max(diffs, key=diffs.get)
                    row.setdefault("worst_metric", []).append((worst, got.metrics.get(worst, got.loss),
                                                               want.metrics.get(worst, want.loss)))
                    if set(got.metrics) != set(want.metrics):
                        d = math.inf
                    row["metrics_rel"] = max(row["metrics_rel"], d)
                    row[f"loss{which}"] = want.loss
            grads = sr.full_trainable_grads()  # collective
            if rank == 0:
                gref = {n: p.grad.clone() for n, p in ref.trainable_parameters() if p.grad is not None}
                row["grads_rel"] = dict_rel(grads, gref)
            got = sr.optim_step()
            full = sr.full_trainable_state()  # collective
            if rank == 0:
                want = ref.optim_step()
                row["grad_norm_rel"] = rel(got.grad_norm, want.grad_norm)
                row["clipped"] = (got.clipped, want.clipped)
                wref = {n: p.detach() for n, p in ref.trainable_parameters()}
                if cfg["optimizer"] == "adamw":
                    # Adam divides by |g|: a gradient that is 0 in exact arithmetic (the Bradley–Terry reward
                    # bias) is rounding noise in both runs, and Adam makes that noise a ±lr step. Skip those.
                    gscale = max(float(g.abs().max()) for g in gref.values())
                    keep = {n for n, g in gref.items() if float(g.abs().max()) > 1e-6 * gscale} | \
                        (set(wref) - set(gref))
                    row["weights_skipped"] = sorted(set(wref) - keep)
                    full, wref = {n: full[n] for n in keep}, {n: wref[n] for n in keep}
                row["weights_rel"] = dict_rel(full, wref)
                report["rows"].append(row)
                ref.save_state("sync")
            # start the next loss from the very same state (Adam turns fp32 rounding of tiny gradient elements
            # into visible weight differences, which would otherwise compound from loss to loss)
            sr.load_state(comm.all_objects(ref.checkpoint_path("sync") if rank == 0 else None)[0])

        # --- NaN on one rank (loss, then gradients only): every rank raises, no state changes anywhere
        b = batches("enhanced_ppo", 0)
        sr.forward_backward(b, "enhanced_ppo")  # accumulated gradients exist
        for mode in ("value", "grad"):
            before = snapshot(sr)
            undo = inject(sr, mode) if rank == ws - 1 else (lambda: None)
            try:
                sr.forward_backward(b, "enhanced_ppo")
                raised = None
            except Exception as exc:  # noqa: BLE001
                raised = type(exc).__name__
            finally:
                undo()
            unchanged = same(before, snapshot(sr))
            flags = comm.all_objects((raised, unchanged))
            if rank == 0:
                check(f"nan_{mode}_lora{lora_r}", all(r is not None and u for r, u in flags), str(flags))
        # bad input: fails on every rank, nothing changes
        before = snapshot(sr)
        try:
            sr.forward_backward([{"nothing": 1}], "causal_lm")
            raised = None
        except Exception as exc:  # noqa: BLE001
            raised = type(exc).__name__
        flags = comm.all_objects((raised, same(before, snapshot(sr))))
        if rank == 0:
            check(f"bad_input_lora{lora_r}", all(r == "ValueError" and u for r, u in flags), str(flags))
        sr.optimizer.zero_grad(set_to_none=True)
        sr.pending_grads = 0

        # --- sampling: same tokens and log-probs as one process with the same seed
        s_got = sr.sample([[5, 6, 7], [9, 10]], max_tokens=6, temperature=1.0, num_samples=2, seed=11)
        if rank == 0:
            s_want = ref.sample([[5, 6, 7], [9, 10]], max_tokens=6, temperature=1.0, num_samples=2, seed=11)
            toks_ok = [q.tokens for q in s_got.flat()] == [q.tokens for q in s_want.flat()]
            lp = max(abs(a - b) for qg, qw in zip(s_got.flat(), s_want.flat())
                     for a, b in zip(qg.logprobs, qw.logprobs))
            check(f"sample_lora{lora_r}", toks_ok and lp < 1e-5, f"tokens equal {toks_ok}, max |Δlogprob| {lp:.2e}")

        # --- checkpoints: N → 1 and 1 → N, identical next losses
        b = batches("causal_lm", 1)
        sr.save_state("ws")
        path = sr.checkpoint_path("ws")
        if rank == 0:
            one = Run(f"one{lora_r}", RunConfig(**cfg), run_dir=os.path.join(root, f"one{lora_r}"),
                      reference_cache=cache, device="cpu")
            one.load_state(path)
            r1 = one.forward_backward(b, "causal_lm")
            one.optim_step()
            one.save_state("back")
            back = one.checkpoint_path("back")
            r1b = one.forward_backward(b, "causal_lm")
        else:
            back = None
        rn = sr.forward_backward(b, "causal_lm")
        sr.optim_step()
        back = comm.all_objects(back)[0]
        sr.load_state(back)  # 1 → N
        rnb = sr.forward_backward(b, "causal_lm")
        if rank == 0:
            check(f"ckpt_{ws}to1_lora{lora_r}", rel(r1.loss, rn.loss) < 1e-6, f"{r1.loss} vs {rn.loss}")
            check(f"ckpt_1to{ws}_lora{lora_r}", rel(r1b.loss, rnb.loss) < 1e-6, f"{r1b.loss} vs {rnb.loss}")
            one.close()
            ref.close()
        sr.close()

    # --- the engine driven by the usual client (rank 0); the other ranks follow
    if rank == 0:
        from signalrl.client import SignalClient

        eng = ShardedEngine(os.path.join(root, "engine"), comm=comm)
        plain = Engine(os.path.join(root, "plain"))
        try:
            results = []
            for e in (eng, plain):
                c = SignalClient(engine=e)
                info = c.create_run(base_model="signal-tiny", lora_r=4, seed=5, learning_rate=1e-2).result()
                tc = c.get_training_client(info["run_id"])
                fb = tc.forward_backward(batches("causal_lm", 0), "causal_lm")
                fb = fb.result() if hasattr(fb, "result") else fb
                st = tc.optim_step()
                st = st.result() if hasattr(st, "result") else st
                fb2 = tc.forward_backward(batches("causal_lm", 1), "causal_lm")
                fb2 = fb2.result() if hasattr(fb2, "result") else fb2
                results.append((fb.loss, st.grad_norm, fb2.loss))
            d = max(rel(a, b) for a, b in zip(*results))
            check("client_engine", d < 1e-6, f"{results}")
        finally:
            eng.close()
            plain.close()
    else:
        follow(comm)
    report["seconds"] = time.time() - t_start
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)


def failure(comm, out_path: str, root: str, mode: str) -> None:
    """Rank 1 dies (``kill``) or hangs (``hang``) in the second request; rank 0 must report within the timeout."""
    if comm.rank == 0:
        eng = ShardedEngine(os.path.join(root, "engine"), comm=comm)
        from signalrl.client import SignalClient

        c = SignalClient(engine=eng)
        info = c.create_run(base_model="signal-tiny", lora_r=4, seed=5).result()
        tc = c.get_training_client(info["run_id"])
        r = tc.forward_backward(batches("causal_lm", 0), "causal_lm")
        r = r.result() if hasattr(r, "result") else r
        t0 = time.time()
        err = None
        try:
            r = tc.forward_backward(batches("causal_lm", 1), "causal_lm")
            r.result() if hasattr(r, "result") else r
        except Exception as exc:  # noqa: BLE001
            err = f"{type(exc).__name__}: {exc}"
        elapsed = time.time() - t0
        # a later request fails at once with the same clear error
        t1 = time.time()
        try:
            r = tc.forward_backward(batches("causal_lm", 1), "causal_lm")
            r.result() if hasattr(r, "result") else r
            later = None
        except Exception as exc:  # noqa: BLE001
            later = f"{type(exc).__name__}: {exc}"
        with open(out_path, "w") as f:
            json.dump({"error": err, "elapsed": elapsed, "later": later, "later_s": time.time() - t1,
                       "timeout_s": comm.timeout_s}, f)
        os._exit(0)  # the group is broken: do not wait for the dead rank in teardown
    else:
        import signalrl.distributed.run as drun

        calls = {"n": 0}
        orig = drun.ShardedRun.forward_backward

        def fb(self, *a, **kw):
            calls["n"] += 1
            if calls["n"] == 2:
                if mode == "kill":
                    os._exit(3)
                time.sleep(3600)
            return orig(self, *a, **kw)
        drun.ShardedRun.forward_backward = fb
        try:
            follow(comm)
        except Exception:  # noqa: BLE001 - rank 0 is gone (it exits without closing): expected
            pass
        os._exit(0)


def main() -> None:
    mode, out_path, root = sys.argv[1], sys.argv[2], sys.argv[3]
    comm = dcomm.init(timeout_s=float(os.environ.get("SIGNAL_DIST_TIMEOUT", 60)), backend="gloo")
    try:
        if mode == "parity":
            parity(comm, out_path, root)
        else:
            failure(comm, out_path, root, mode)
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
