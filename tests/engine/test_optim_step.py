"""optim_step reports the norm of the accumulated gradients and clips them to ``max_grad_norm``, whether the
per-tensor norms are reused from the one forward_backward since the last step or recomputed after several."""
import math

import pytest
import torch

from signalrl.losses import get_loss

SFT = [{"prompt": "2+2=", "response": "4"}, {"prompt": "hello ", "response": "world"}]
SFT2 = [{"prompt": "abc", "response": "def"}, {"prompt": "x", "response": "yz"}]


def _norm(grads):
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def _grads(run):
    return [p.grad.clone() for _, p in run.trainable_parameters() if p.grad is not None]


@pytest.mark.parametrize("accumulations", [1, 2, 3])
def test_grad_norm_is_that_of_the_accumulated_gradients(make_run, accumulations):
    run = make_run(lora_r=4, learning_rate=1e-2, max_grad_norm=None)
    for i in range(accumulations):
        run.forward_backward(SFT if i % 2 == 0 else SFT2, "causal_lm")
    expected = _norm(_grads(run))
    step = run.optim_step()
    assert step.grad_norm == pytest.approx(expected, rel=1e-5)
    assert not step.clipped


def test_clipping_scales_the_gradients_to_max_grad_norm(make_run):
    run = make_run(lora_r=4, learning_rate=1e-2, max_grad_norm=1e-4, optimizer="sgd")
    run.forward_backward(SFT, "causal_lm")
    before = {n: p.detach().clone() for n, p in run.trainable_parameters()}
    grads = {n: p.grad.clone() for n, p in run.trainable_parameters() if p.grad is not None}
    total = _norm(grads.values())
    assert total > 1e-4
    step = run.optim_step()
    assert step.clipped and step.grad_norm == pytest.approx(total, rel=1e-5)
    scale = 1e-4 / (step.grad_norm + 1e-6)
    for n, p in run.trainable_parameters():  # plain SGD: w' = w - lr * scale * g
        if n in grads:
            torch.testing.assert_close(p.detach(), before[n] - 1e-2 * scale * grads[n], rtol=1e-6, atol=1e-9)


def test_a_head_created_by_forward_backward_counts_in_the_norm(make_run):
    run = make_run(lora_r=4, learning_rate=1e-2, max_grad_norm=None)
    run.forward_backward(SFT, "causal_lm")
    run.optim_step()
    n_before = len(run.trainable_parameters())
    assert get_loss("enhanced_ppo").needs_value_head
    sampled = run.sample(["ab>"] * 2, max_tokens=4, seed=0).flat()
    ppo = [{"prompt": q.prompt_tokens, "response": q.tokens, "old_log_probs": q.logprobs, "rewards": 1.0}
           for q in sampled]
    run.forward_backward(ppo, "enhanced_ppo")
    assert len(run.trainable_parameters()) > n_before and "value" in run.heads
    expected = _norm(_grads(run))
    assert run.optim_step().grad_norm == pytest.approx(expected, rel=1e-5)


def test_float64_runs_take_norms_without_narrowing(make_run):
    run = make_run(lora_r=0, learning_rate=1e-2, max_grad_norm=None, dtype=torch.float64)
    run.forward_backward(SFT, "causal_lm")
    grads = _grads(run)
    assert grads and all(g.dtype == torch.float64 for g in grads)
    assert run.optim_step().grad_norm == pytest.approx(_norm(grads), rel=1e-6)


def test_a_step_retried_after_a_failure_recomputes_the_norm(make_run, monkeypatch):
    """optim_step clips in place before the optimizer runs: if the optimizer then fails, a retry must measure the
    gradients as they are now, not reuse the norms cached by forward_backward."""
    run = make_run(lora_r=4, learning_rate=1e-2, max_grad_norm=1e-4, optimizer="sgd")
    run.forward_backward(SFT, "causal_lm")
    real_step = run.optimizer.step

    def fail_once(*args, **kwargs):
        monkeypatch.setattr(run.optimizer, "step", real_step)
        raise RuntimeError("simulated failure inside the optimizer")

    monkeypatch.setattr(run.optimizer, "step", fail_once)
    with pytest.raises(RuntimeError, match="simulated"):
        run.optim_step()
    now = _norm(_grads(run))
    assert now == pytest.approx(1e-4, rel=1e-3)  # clipped once
    step = run.optim_step()
    assert step.grad_norm == pytest.approx(now, rel=1e-5)
