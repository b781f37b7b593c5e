"""Sampling: per-token log-probs agree with what the losses compute; seeds, eos, greedy."""
import pytest
import torch

from signalrl.engine.tokenizer import EOS_ID


def _device(run):
    return next(run.model.parameters()).device


def _loss_side_logprobs(run, seqs):
    from signalrl.losses.model import PolicyModel

    ids = [s.prompt_tokens + s.tokens for s in seqs]
    T = max(map(len, ids))
    dev = _device(run)
    input_ids = torch.tensor([x + [0] * (T - len(x)) for x in ids], device=dev)
    mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids], device=dev)
    with torch.no_grad():
        lp = PolicyModel(run.model).token_logprobs(input_ids, mask).cpu()
    return [lp[i, len(s.prompt_tokens):len(s.prompt_tokens) + len(s.tokens)] for i, s in enumerate(seqs)]


@pytest.mark.parametrize("lora_r", [0, 4])
def test_sample_logprobs_match_loss_logprobs_at_temperature_1(make_run, lora_r):
    run = make_run(lora_r=lora_r, seed=1)
    if lora_r:  # make the adapters non-trivial so the LoRA path is really exercised
        with torch.no_grad():
            for n, p in run.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.2)
    res = run.sample(["hi there", "a", [1, 70, 71, 72]], max_tokens=12, temperature=1.0, num_samples=3, seed=0)
    seqs = res.flat()
    assert len(res.sequences) == 3 and all(len(g) == 3 for g in res.sequences)
    for s, ref in zip(seqs, _loss_side_logprobs(run, seqs)):
        assert len(s.logprobs) == len(s.tokens) > 0
        torch.testing.assert_close(torch.tensor(s.logprobs), ref, rtol=0, atol=2e-5)


def test_tempered_logprobs_are_those_of_the_sampling_distribution(make_run):
    run = make_run(lora_r=0, seed=2)
    s = run.sample(["xy"], max_tokens=6, temperature=0.5, num_samples=2, seed=1).flat()[0]
    ids = torch.tensor([s.prompt_tokens + s.tokens], device=_device(run))
    with torch.no_grad():
        logits = run.model(input_ids=ids).logits[0, len(s.prompt_tokens) - 1:-1].float().cpu()
    expected = torch.log_softmax(logits / 0.5, -1).gather(1, torch.tensor(s.tokens)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(s.logprobs), expected, rtol=0, atol=2e-5)


def test_seed_determinism_and_generator_advances(make_run):
    run = make_run(lora_r=0, seed=3)
    a = run.sample(["abc"], max_tokens=10, num_samples=4, seed=7).flat()
    b = run.sample(["abc"], max_tokens=10, num_samples=4, seed=7).flat()
    assert [x.tokens for x in a] == [x.tokens for x in b]
    c = run.sample(["abc"], max_tokens=10, num_samples=4).flat()
    d = run.sample(["abc"], max_tokens=10, num_samples=4).flat()
    assert [x.tokens for x in c] != [x.tokens for x in d]


def test_greedy_and_eos(make_run):
    run = make_run(lora_r=0, seed=4)
    g = run.sample(["hello"], max_tokens=5, temperature=0.0, num_samples=2).flat()
    assert g[0].tokens == g[1].tokens  # greedy is deterministic
    dev = _device(run)
    ids = torch.tensor([g[0].prompt_tokens], device=dev)
    with torch.no_grad():
        for tok in g[0].tokens:
            nxt = int(run.model(input_ids=ids).logits[0, -1].argmax())
            assert nxt == tok
            ids = torch.cat([ids, torch.tensor([[tok]], device=dev)], 1)
    assert g[0].finish_reason == "length" and len(g[0].tokens) == 5

    bias = torch.zeros(run.model.config.vocab_size, device=_device(run))
    bias[EOS_ID] = 100.0  # the model now ends every sequence at once
    hook = run.model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    try:
        s = run.sample(["hello", "x"], max_tokens=5, num_samples=2, seed=0).flat()
    finally:
        hook.remove()
    for x in s:
        assert x.tokens == [EOS_ID] and x.finish_reason == "stop" and x.text == "" and len(x.logprobs) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[]), "prompts"), (dict(prompts="abc"), "prompts"), (dict(prompts=["a"], max_tokens=0), "max_tokens"),
    (dict(prompts=["a"], temperature=-1.0), "temperature"), (dict(prompts=["a"], num_samples=0), "num_samples"),
    (dict(prompts=[[1, "x"]]), r"prompts\[0\]"),
])
def test_bad_arguments(make_run, kwargs, match):
    run = make_run(lora_r=0)
    with pytest.raises((TypeError, ValueError), match=match):
        run.sample(**kwargs)
