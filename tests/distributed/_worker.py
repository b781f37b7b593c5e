"""One rank of a distributed test job (launched by tests/distributed/test_sharded.py, or by hand with
``torchrun --standalone --nproc-per-node N tests/distributed/_worker.py <mode> <out.json> <root_dir>``).

``parity``: every loss × LoRA/full fine-tuning × two accumulated forward_backward calls + optim_step, compared
with a one-process :class:`Run` on the same global batch (rank 0 runs it); NaN on one rank; checkpoints 2 → 1 and
1 → N; sampling; export_model (merged LoRA and full fine-tuning, loaded back with ``from_pretrained``, against a
one-process export; refusal and overwrite); the native kernels actually running (the fused linear log-prob op on
the gathered head); the engine driven by the usual client. ``kill``/``hang``: rank 1 dies/hangs mid-request.
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

T_PROCESS = time.time()
os.environ.setdefault("OMP_NUM_THREADS", "1")
# the gloo (CPU) path is under test: on a CUDA machine the single-process twins would otherwise run on the GPU
os.environ["CUDA_VISIBLE_DEVICES"] = ""
warnings.filterwarnings("ignore")

import torch  # noqa: E402

torch.set_num_threads(1)

from signalrl.distributed import comm as dcomm  # noqa: E402
from signalrl.distributed.engine import ShardedEngine, follow  # noqa: E402
from signalrl.distributed.run import ShardedRun, _local  # noqa: E402
from signalrl.engine.engine import Engine  # noqa: E402
from signalrl.engine.run import Run  # noqa: E402
from signalrl.ops._library import kernels_run  # noqa: E402

from _cases import ALL_LOSSES, KWARGS, batches, dict_rel, norm_rel, rel  # noqa: E402

LOSSES = os.environ.get("SIGNAL_TEST_LOSSES", ",".join(ALL_LOSSES)).split(",")


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


def load_export(path: str) -> tuple[dict, list[str]]:
    """An exported directory loaded as a Hugging Face model: its tensors, and the files of the directory."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, sorted(os.listdir(path))


def outcome(fn) -> str:
    """``fn()``'s result as a string, or the name of the exception it raised."""
    try:
        return str(fn())
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__


def backend_report() -> dict:
    """Which backend the fused linear ops take for CPU tensors here, and whether native was expected."""
    from signalrl import native, ops

    forced = os.environ.get("SIGNAL_BACKEND") or None
    x = torch.zeros(1)
    return {"native_available": native.available(), "why_not": native.why(), "forced": forced,
            "expect_native": native.available() and forced in (None, "native"),
            **{k: ops.backend_for(k, x) for k in ("linear_token_logprobs_fwd", "linear_token_logprobs_bwd",
                                                  "linear_ppo_fwd")}}


def parity(comm, out_path: str, root: str) -> None:
    rank, ws = comm.rank, comm.world_size
    report: dict = {"world_size": ws, "rows": [], "checks": {}, "errors": [], "backend": backend_report()}
    t_start = time.time()
    phases: dict[str, float] = {}
    t_phase = [t_start]

    def lap(name):  # seconds per phase, summed over the two configurations
        now = time.time()
        phases[name] = phases.get(name, 0.0) + now - t_phase[0]
        t_phase[0] = now

    def check(name, ok, detail=""):
        report["checks"][name] = {"ok": bool(ok), "detail": detail}

    for lora_r, opt in ((4, "adamw"), (0, "sgd")):
        cfg = dict(base_model="signal-tiny", lora_r=lora_r, learning_rate=1e-2, seed=3, max_grad_norm=0.5,
                   optimizer=opt, momentum=0.9 if opt == "sgd" else 0.0)
        from signalrl.engine.config import RunConfig
        from signalrl.engine.frozen_models import ReferenceCache
        from signalrl.engine.models import load_base_model

        cache = ReferenceCache(lambda name, **kw: load_base_model(name, arg="reference_model", **kw)[0], capacity=2)
        # an uneven split in the 3-rank job: rank 2 takes the most rows (and one rank may take none)
        split = None if ws == 2 else (lambda n: [n // 5, n // 3, n - n // 5 - n // 3])
        sr = ShardedRun(f"s{lora_r}", RunConfig(**cfg), comm=comm, run_dir=os.path.join(root, f"s{lora_r}"),
                        reference_cache=cache, device="cpu", split=split)
        ref = Run(f"r{lora_r}", RunConfig(**cfg), run_dir=os.path.join(root, f"r{lora_r}-{rank}"),
                  reference_cache=cache, device="cpu") if rank == 0 else None
        twin = Run(f"t{lora_r}", RunConfig(**cfg), run_dir=os.path.join(root, f"t{lora_r}"), reference_cache=cache,
                   device="cpu") if rank == 0 else None
        lap("build runs")
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
                ref.save_state("pre")  # weights, heads and optimizer state just before the step
            got = sr.optim_step()
            full = sr.full_trainable_state()  # collective
            if rank == 0:
                want = ref.optim_step()
                row["grad_norm_rel"] = rel(got.grad_norm, want.grad_norm)
                row["clipped"] = (got.clipped, want.clipped)
                wref = {n: p.detach() for n, p in ref.trainable_parameters()}
                # the same one-process optimizer step on the sharded run's own gradients: isolates the optimizer
                # step (sharded vs one process) from the gradients' float32 reduction order
                twin.load_state(ref.checkpoint_path("pre"))
                for n, p in twin.trainable_parameters():
                    p.grad = grads[n].clone() if n in grads else None
                twin.pending_grads = 2
                twin.optim_step()
                row["step_rel"] = dict_rel(full, {n: p.detach() for n, p in twin.trainable_parameters()})
                row["weights_rel"] = dict_rel(full, wref)  # elementwise, on the model's scale
                row["weights_norm_rel"] = norm_rel(full, wref)  # normwise over the run's whole trainable state
                report["rows"].append(row)
                ref.save_state("sync")
            # start the next loss from the very same state (Adam turns fp32 rounding of tiny gradient elements
            # into visible weight differences, which would otherwise compound from loss to loss)
            sr.load_state(comm.all_gather_value(ref.checkpoint_path("sync") if rank == 0 else None)[0])

        lap("losses")
        # --- NaN on one rank (loss, then gradients only): every rank raises, no state changes anywhere
        b = batches("enhanced_ppo", 0)
        # accumulated gradients exist; the kernels that ran, on every rank: the native fused log-prob op (forward
        # and backward) on the FSDP-gathered LM head, unless native cannot build here (or a backend is forced)
        seen = comm.all_gather_value(sorted(kernels_run(lambda: sr.forward_backward(b, "enhanced_ppo"))))
        if rank == 0:
            # the plain kernels, or the kept-logits plan's (a call small enough keeps its logits for the backward)
            fused = [{f"signalrl::linear_token_logprobs{plan}_{part}" for part in ("fwd", "bwd")}
                     for plan in ("", "_kept")]
            be = report["backend"]
            ok = all(any(want <= set(s) for want in fused) for s in seen) \
                and be["linear_token_logprobs_fwd"] == "native" if be["expect_native"] else True
            check(f"native_ops_lora{lora_r}", ok, f"{be}; ops seen per rank: {seen}")
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
            flags = comm.all_gather_value((raised, unchanged))
            if rank == 0:
                check(f"nan_{mode}_lora{lora_r}", all(r is not None and u for r, u in flags), str(flags))
        # bad input: fails on every rank, nothing changes
        before = snapshot(sr)
        try:
            sr.forward_backward([{"nothing": 1}], "causal_lm")
            raised = None
        except Exception as exc:  # noqa: BLE001
            raised = type(exc).__name__
        flags = comm.all_gather_value((raised, same(before, snapshot(sr))))
        if rank == 0:
            check(f"bad_input_lora{lora_r}", all(r == "ValueError" and u for r, u in flags), str(flags))
        sr.optimizer.zero_grad(set_to_none=True)
        sr.pending_grads = 0

        lap("nan and bad input")
        # --- sampling: same tokens and log-probs as one process with the same seed
        s_got = sr.sample([[5, 6, 7], [9, 10]], max_tokens=6, temperature=1.0, num_samples=2, seed=11)
        if rank == 0:
            s_want = ref.sample([[5, 6, 7], [9, 10]], max_tokens=6, temperature=1.0, num_samples=2, seed=11)
            toks_ok = [q.tokens for q in s_got.flat()] == [q.tokens for q in s_want.flat()]
            lp = max(abs(a - b) for qg, qw in zip(s_got.flat(), s_want.flat())
                     for a, b in zip(qg.logprobs, qw.logprobs))
            check(f"sample_lora{lora_r}", toks_ok and lp < 1e-5, f"tokens equal {toks_ok}, max |Δlogprob| {lp:.2e}")

        lap("sampling")
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
        lap("checkpoints")
        # --- export: the sharded run and `one` took the same step from the same state, independently
        target = os.path.join(root, f"export-s{lora_r}")
        exp = sr.export_model(target)
        paths = comm.all_gather_value(exp)
        if rank == 0:
            got, got_files = load_export(exp)
            want, want_files = load_export(one.export_model(os.path.join(root, f"export-1-{lora_r}")))
            d = dict_rel(got, want)
            report[f"export_lora{lora_r}"] = {"rel": d, "norm_rel": norm_rel(got, want), "tensors": len(want),
                                              "files": got_files}
            check(f"export_lora{lora_r}", paths == [target] * ws and set(got) == set(want)
                  and got_files == want_files and d <= 1e-6,
                  f"paths {paths}, {len(got)} vs {len(want)} tensors, files {got_files} vs {want_files}, "
                  f"max rel {d:.2e}")
        if lora_r:  # refusal and overwrite, once: every rank gets the same answer, nothing is left behind
            foreign = os.path.join(root, "not-an-export")
            if rank == 0:
                os.makedirs(foreign, exist_ok=True)
                with open(os.path.join(foreign, "keep.txt"), "w") as f:
                    f.write("mine")
            results = (outcome(lambda: sr.export_model(target)),  # a previous export: refused without overwrite
                       outcome(lambda: sr.export_model(target, overwrite=True)),  # replaced with it
                       outcome(lambda: sr.export_model(foreign, overwrite=True)))  # not an export: refused
            flags = comm.all_gather_value(results)
            if rank == 0:
                again, _ = load_export(target)
                left = [n for n in os.listdir(root) if n.startswith(".signal-export-")]
                expected = [("ValueError", target, "ValueError")] + [("RankFailedError", target, "RankFailedError")] \
                    * (ws - 1)
                check("export_refuse_overwrite", [tuple(f) for f in flags] == expected and dict_rel(again, got) == 0
                      and os.listdir(foreign) == ["keep.txt"] and not left, f"{flags}; leftovers {left}")
        lap("export")
        back = comm.all_gather_value(back)[0]
        sr.load_state(back)  # 1 → N
        rnb = sr.forward_backward(b, "causal_lm")
        if rank == 0:
            check(f"ckpt_{ws}to1_lora{lora_r}", rel(r1.loss, rn.loss) < 1e-6, f"{r1.loss} vs {rn.loss}")
            check(f"ckpt_1to{ws}_lora{lora_r}", rel(r1b.loss, rnb.loss) < 1e-6, f"{r1b.loss} vs {rnb.loss}")
            one.close()
            ref.close()
            twin.close()
        sr.close()

        lap("checkpoints")
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
                ex = tc.export_model(os.path.join(root, f"client-export-{len(results)}"))
                ex = ex.result() if hasattr(ex, "result") else ex
                results.append((fb.loss, st.grad_norm, fb2.loss, ex))
            d = max(rel(a, b) for a, b in zip(*[r[:3] for r in results]))
            check("client_engine", d < 1e-6, f"{results}")
            (got, got_files), (want, want_files) = load_export(results[0][3]), load_export(results[1][3])
            d = dict_rel(got, want)
            check("client_export", set(got) == set(want) and got_files == want_files and d <= 1e-6,
                  f"{results[0][3]} vs {results[1][3]}: max rel {d:.2e}")
        finally:
            eng.close()
            plain.close()
    else:
        follow(comm)
    lap("client and engine")
    report["phases"] = {"imports and process group": t_start - T_PROCESS, **phases}
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
