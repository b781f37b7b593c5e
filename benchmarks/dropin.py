"""Drop-in integrations, measured: peak memory and step time of an SFT step and a GRPO step, stock vs Signal, on a
small-hidden Llama with a 128256-token vocabulary (the regime where the LM head dominates).

    python -m benchmarks.dropin [--vocab 128256] [--hidden 256] [--steps 5] [--quick] [--out FILE]

Memory: each configuration runs alone in a fresh subprocess: build the model and the batch, call every kernel once
on a tiny input (so the native extension and lazy imports are loaded), read the high-water mark of the resident set
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), run a warm-up step and ``--mem-steps`` steps, read it again.
"Peak MiB" is the growth: the activations, logits and gradients a step needs on top of the model (torch has no CPU
allocator statistics; tracemalloc does not see torch's allocations).

Time: the configurations of one step kind are built side by side in one subprocess and stepped in turn, ``--steps``
rounds after a warm-up, the order rotating each round, so the load of a shared machine hits them alike; the table
gives the median step and the median over rounds of the per-round ratio to stock. A step is forward + backward (no
optimizer: it is the same on both sides).

SFT step: ``model(input_ids, attention_mask, labels).loss.backward()`` — stock transformers, then after
``signalrl.patch(model)``.

GRPO step: TRL 1.16's ``GRPOTrainer._compute_loss`` + backward on one batch of B prompts × completions, with
``old_per_token_logps`` in the batch (``num_iterations > 1``), for
  - ``full logits``: the same loss computed from ``model(...).logits`` (log-softmax + gather: a hand-written loop,
    or TRL before its fused head);
  - ``TRL stock``: ``GRPOTrainer`` (TRL's own chunked LM head);
  - ``Signal, fused loss``: ``SignalGRPOTrainer`` (``ops.linear_ppo_loss`` in one pass);
  - ``Signal, log-prob head``: ``SignalGRPOTrainer`` without ``old_per_token_logps`` (``num_iterations == 1``:
    Signal's log-prob head under TRL's loss).

Writes ``benchmarks/results/dropin_<device>.md`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from . import save_study

CONFIGS = {
    "sft/stock": "SFT step, stock transformers loss",
    "sft/signal": "SFT step, signalrl.patch(model)",
    "grpo/full_logits": "GRPO step, loss from full logits",
    "grpo/trl": "GRPO step, TRL GRPOTrainer (stock)",
    "grpo/signal_fused": "GRPO step, SignalGRPOTrainer (fused loss)",
    "grpo/signal_logprob": "GRPO step, SignalGRPOTrainer (log-prob head, no old log-probs)",
}


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float()
    model.train()
    return model


def _warm_kernels():
    """Load the native extension and the ops' lazy imports on a tiny input (not counted in the peak)."""
    import torch

    from signalrl import ops

    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(16, 8, requires_grad=True)
    t = torch.randint(0, 16, (4,))
    lp, ent = ops.linear_token_logprobs(h, w, t, return_entropy=True)
    loss, _ = ops.linear_ppo_loss(h, w, t, lp.detach(), torch.ones(4), kl_coef=0.1, ref_logprobs=lp.detach())
    (lp.sum() + ent.sum() + loss).backward()


def _sft_step(args, patched: bool):
    import torch

    model = _model(args)
    if patched:
        from signalrl.integrations import patch

        patch(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    attn = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : args.seq // 4] = -100  # a prompt that does not count

    def step():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=attn, labels=labels)
        out.loss.backward()
        return out.loss.detach()

    return step


def _grpo_step(args, kind: str):
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from signalrl.engine.tokenizer import build_byte_tokenizer
    from signalrl.integrations import SignalGRPOTrainer

    model = _model(args)
    tok = build_byte_tokenizer()
    tok.padding_side = "left"
    cfg = GRPOConfig(output_dir=os.path.join(args.tmp, kind.replace("/", "_")), use_cpu=True, bf16=False,
                     report_to=[], save_strategy="no", per_device_train_batch_size=args.batch, num_generations=2,
                     max_completion_length=args.seq - args.prompt, loss_type="grpo", beta=0.0, disable_tqdm=True)
    cls = GRPOTrainer if kind in ("grpo/trl", "grpo/full_logits") else SignalGRPOTrainer
    trainer = cls(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=cfg,
                  train_dataset=Dataset.from_dict({"prompt": ["a"] * args.batch}), processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1
    B, P, L = args.batch, args.prompt, args.seq - args.prompt
    g = torch.Generator().manual_seed(2)
    inputs = {
        "prompt_ids": torch.randint(0, args.vocab, (B, P), generator=g),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.randint(0, args.vocab, (B, L), generator=g),
        "completion_mask": torch.ones(B, L, dtype=torch.long),
        "advantages": torch.randn(B, generator=g),
        "num_items_in_batch": torch.tensor(float(B * L)),
    }
    inputs["completion_mask"][0, L // 2:] = 0
    if kind != "grpo/signal_logprob":
        # old log-probs near the current ones, computed without logits (the set-up must not raise the baseline)
        from signalrl import ops

        with torch.no_grad():
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            hidden = model.get_decoder()(input_ids=ids).last_hidden_state[:, P - 1:-1]
            lp = ops.linear_token_logprobs(hidden, model.lm_head.weight, inputs["completion_ids"])
            inputs["old_per_token_logps"] = lp + 0.05 * torch.randn(B, L, generator=g)
    if kind == "grpo/signal_fused":
        assert trainer.signal_fused_loss_reason(inputs) is None

    if kind == "grpo/full_logits":
        eps = trainer.epsilon_low

        def loss_fn():
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            logits = model(input_ids=ids, attention_mask=attn).logits[:, P - 1:-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
            ratio = torch.exp(lp - inputs["old_per_token_logps"])
            adv = inputs["advantages"].unsqueeze(1)
            per_tok = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
            m = inputs["completion_mask"].float()
            return ((per_tok * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    else:
        def loss_fn():
            return trainer._compute_loss(model, inputs)

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    return step


def _builder(name: str, args):
    return _sft_step(args, name == "sft/signal") if name.startswith("sft/") else _grpo_step(args, name)


def _worker(args) -> dict:
    """Peak memory of one configuration (this process runs nothing else)."""
    import torch

    torch.set_num_threads(args.threads)
    step = _builder(args.worker, args)
    _warm_kernels()
    base = _maxrss_mib()
    loss = float(step())  # warm-up (counted in the peak: it is a step like the others)
    for _ in range(args.mem_steps):
        step()
    return {"config": args.worker, "loss": loss, "peak_mib": _maxrss_mib() - base, "maxrss_mib": _maxrss_mib(),
            "base_mib": base}


def _time_worker(args) -> dict:
    """Step times of every configuration of one step kind, interleaved round by round in one process (so the load
    of a shared machine hits them alike); the order rotates each round."""
    import torch

    torch.set_num_threads(args.threads)
    kind = args.worker.split("/", 1)[1]
    names = [n for n in (args.only or CONFIGS) if n.startswith(kind + "/")]
    steps = {n: _builder(n, args) for n in names}
    _warm_kernels()
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.steps):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            steps[n]()
            times[n].append(1000 * (time.perf_counter() - t0))
    return {"kind": kind, "times_ms": times}


def _run_worker(name: str, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.dropin", "--worker", name, "--vocab", str(args.vocab), "--hidden",
           str(args.hidden), "--batch", str(args.batch), "--seq", str(args.seq), "--prompt", str(args.prompt),
           "--steps", str(args.steps), "--mem-steps", str(args.mem_steps), "--threads", str(args.threads),
           "--tmp", args.tmp]
    if args.only:
        cmd += ["--only", *args.only]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SIGNAL_BACKEND", "SIGNAL_CHECK")}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"config": name, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _report(rows: dict, times: dict, args, command: str) -> str:
    import torch
    import transformers
    import trl

    def fmt(r, key, unit=""):
        return "error" if "error" in r else f"{r[key]:,.0f}{unit}"

    lines = [
        "# Drop-in integrations on CPU: peak memory and step time",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {_cpu_name()}, {args.threads} threads (a shared VM); torch {torch.__version__}, transformers "
        f"{transformers.__version__}, trl {trl.__version__}; run {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC.",
        f"Model: Llama, hidden {args.hidden}, 2 layers, vocabulary {args.vocab}, untied head, float32; batch "
        f"{args.batch} × {args.seq} tokens (SFT: first {args.seq // 4} labels -100; GRPO: {args.prompt}-token prompts, "
        f"{args.seq - args.prompt}-token completions). Step = forward + backward (no optimizer).",
        "",
        f"- Peak: growth of the resident-set high-water mark (`ru_maxrss`) over a warm-up and {args.mem_steps} "
        "step(s), each configuration alone in a fresh process (torch has no CPU allocator statistics; tracemalloc "
        "does not see torch's allocations).",
        f"- Time: the configurations of a step kind run in one process, interleaved for {args.steps} rounds after a "
        "warm-up (rotating order), so the load of this shared machine hits them alike; median ms per step, and "
        "× stock = the median over rounds of the per-round ratio.",
        "",
        "| step | configuration | peak MiB | × stock | median ms | × stock |",
        "|---|---|---:|---:|---:|---:|",
    ]
    stock_of = {"sft": "sft/stock", "grpo": "grpo/trl"}
    for name, r in rows.items():
        kind = name.split("/")[0]
        s = rows.get(stock_of[kind], {"error": "not run"})
        t = times.get(kind, {}).get("times_ms", {})
        mine, base = t.get(name), t.get(stock_of[kind])
        peak = "error" if "error" in r else f"{r['peak_mib']:,.0f}"
        ms = f"{statistics.median(mine):,.0f}" if mine else "error"
        ratio_m = ratio_t = ""
        if name != stock_of[kind]:
            if "error" not in r and "error" not in s:
                ratio_m = f"{r['peak_mib'] / max(s['peak_mib'], 1e-9):.2f}×"
            if mine and base:
                ratio_t = f"{statistics.median(a / b for a, b in zip(mine, base)):.2f}×"
        label = CONFIGS[name].split(", ", 1)[1]
        lines.append(f"| {kind.upper()} | {label} | {peak} | {ratio_m} | {ms} | {ratio_t} |")
    lines += [
        "",
        "GRPO ratios are against TRL's stock `GRPOTrainer`, which since TRL 1.16 already scores tokens with its own "
        "chunked LM head (tiles of 4096 tokens × 32768 vocabulary entries); `full logits` is the loss computed from "
        "`model(...).logits`, as hand-written loops and earlier TRL versions do. Losses agree between configurations "
        "of a step (same batch, same weights; `log-prob head` has no old log-probs, so ratio 1 and its own loss): "
        + ", ".join(f"{n} {r['loss']:.6g}" for n, r in rows.items() if "error" not in r) + ".",
        "",
        "Where the time goes on CPU: Signal's native ops never keep the logits; their backward recomputes them tile "
        "by tile (one more hidden × vocabulary matmul than a cross-entropy from stored logits), so against PyTorch's "
        "loss from full logits the step trades time for memory (the op table in `benchmarks/results/cpu/results.md` "
        "shows the same for the op alone). Against TRL's head, which folds its tiles with PyTorch ops on CPU (its "
        "Triton kernels run on CUDA only), Signal is faster and smaller.",
        "",
        "GPU, and Liger-Kernel (`apply_liger_kernel_to_llama`, `LigerFusedLinearCrossEntropyLoss`) as the peer: "
        "**unmeasured** — no GPU was available to this run, and this script measures CPU resident memory only.",
        "",
    ]
    errors = {n: r["error"] for n, r in {**rows, **times}.items() if "error" in r}
    if errors:
        lines += ["Errors: " + json.dumps(errors), ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed rounds")
    p.add_argument("--mem-steps", type=int, default=1, help="steps after the warm-up in the memory runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test of the script)")
    p.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="run these configurations only")
    p.add_argument("--out", default=None)
    p.add_argument("--tmp", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.hidden, args.batch, args.seq, args.prompt, args.steps = 512, 32, 2, 24, 8, 2
    if args.tmp is None:
        import tempfile

        args.tmp = tempfile.mkdtemp(prefix="signal-dropin-")
    if args.worker:
        print(json.dumps(_time_worker(args) if args.worker.startswith("time/") else _worker(args)))
        return 0
    command = "python -m benchmarks.dropin " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    rows, times = {}, {}
    for name in (args.only or CONFIGS):
        rows[name] = _run_worker(name, args)
        r = rows[name]
        print(name, r.get("error") or f"peak {r['peak_mib']:.0f} MiB", flush=True)
    for kind in sorted({n.split("/")[0] for n in rows}):
        times[kind] = _run_worker(f"time/{kind}", args)
        t = times[kind]
        print(kind, t.get("error") or {n: round(statistics.median(v)) for n, v in t["times_ms"].items()}, flush=True)
    text = _report(rows, times, args, command.strip())
    if args.quick and not args.out:
        print(text)
    save_study(text, args.out, "dropin_cpu.md", args.quick)
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
