"""TRL's trainers with Signal's kernels: a few steps patched vs stock from the same seed end with the same losses,
metrics and weights (float32), and the policy's output layer never produces [B, T, V] logits."""
from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset  # noqa: E402

from signalrl.engine.tokenizer import build_byte_tokenizer  # noqa: E402
from signalrl.integrations import SignalDPOTrainer, SignalGRPOTrainer, SignalSFTTrainer  # noqa: E402

from ._models import tiny_model  # noqa: E402

BYTE_VOCAB = 260
COMMON = dict(use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1, seed=0,
              disable_tqdm=True, learning_rate=0.1, optim="sgd", max_steps=2)


def _tokenizer(side="left"):
    tok = build_byte_tokenizer()
    tok.padding_side = side
    return tok


def _reward(completions, **_):
    return [float(c.count("a")) + 0.1 * len(c) for c in completions]


class _HeadSpy:
    """Records the sequence length of every output the policy's head module produces."""

    def __init__(self, model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.lengths = []
        self.handle = base.get_output_embeddings().register_forward_hook(
            lambda m, a, o: self.lengths.append(o.shape[-2] if o.dim() == 3 else o.shape[0]))


@pytest.fixture
def signal_head_calls(monkeypatch):
    """Counts the calls of Signal's head (the trainers' log-prob path)."""
    from signalrl.integrations import trainers

    calls = []
    inner = trainers.fused_head_outputs
    monkeypatch.setattr(trainers, "fused_head_outputs", lambda *a, **k: calls.append(1) or inner(*a, **k))
    return calls


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same_run(stock, signal, keys, rtol=1e-4):
    (l_a, w_a), (l_b, w_b) = stock, signal
    assert len(l_a) == len(l_b) >= 2
    for a, b in zip(l_a, l_b):
        for k in keys:
            if k in a:
                assert k in b, k
                torch.testing.assert_close(torch.tensor(b[k]), torch.tensor(a[k]), rtol=rtol, atol=1e-6,
                                           msg=lambda m: f"{k}: {m}")
    for n, w in w_a.items():
        torch.testing.assert_close(w_b[n], w, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


# --- GRPO --------------------------------------------------------------------------------------------

def _grpo(cls, tmp_path, *, loss_type, num_iterations=1, beta=0.0, lora=False, **extra):
    from peft import LoraConfig
    from trl import GRPOConfig

    path = tmp_path / "policy"
    if not path.exists():
        tiny_model("llama", vocab=BYTE_VOCAB).save_pretrained(path)
    torch.manual_seed(0)
    args = GRPOConfig(
        output_dir=str(tmp_path / cls.__name__), per_device_train_batch_size=4, num_generations=2,
        max_completion_length=4, loss_type=loss_type, num_iterations=num_iterations, beta=beta, **COMMON, **extra,
    )
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None
    ds = Dataset.from_dict({"prompt": ["ab", "hello", "xyz q", "12"] * 2})
    trainer = cls(model=str(path), reward_funcs=_reward, args=args, train_dataset=ds, processing_class=_tokenizer(),
                  peft_config=peft_config)
    spy = _HeadSpy(trainer.model)
    fused_calls = []
    if cls is SignalGRPOTrainer:
        inner = trainer._signal_fused_loss
        trainer._signal_fused_loss = lambda *a: fused_calls.append(1) or inner(*a)
    trainer.train()
    spy.handle.remove()
    assert max(spy.lengths, default=0) <= 1  # only generation's last-position logits, never [B, T, V]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return (logs, _weights(trainer.model)), len(fused_calls)


GRPO_KEYS = ("loss", "entropy", "kl", "clip_ratio/region_mean", "reward")


@pytest.mark.parametrize(
    "loss_type,num_iterations,beta,lora,fused",
    [
        ("grpo", 1, 0.0, False, False),  # ratio 1: Signal's log-prob head under TRL's loss
        ("grpo", 2, 0.0, False, True),  # old log-probs in the batch: the one-pass fused loss
        ("bnpo", 2, 0.0, False, True),
        ("bnpo", 2, 0.0, True, True),  # the fused loss through peft's forward
        ("dr_grpo", 2, 0.0, False, True),
        ("dapo", 2, 0.04, False, True),  # KL against a reference model loaded beside the policy
        ("dapo", 2, 0.04, True, False),  # LoRA (reference: adapters off); TRL's default KL × ratio correction
        ("sapo", 2, 0.0, False, False),  # a variant outside the fused op: TRL's math on Signal's log-probs
    ],
)
def test_grpo_trainer_matches_stock(tmp_path, signal_head_calls, loss_type, num_iterations, beta, lora, fused):
    from trl import GRPOTrainer

    # use_bias_correction_kl (TRL's default) multiplies the KL by the ratio, which the fused op does not
    extra = {"use_bias_correction_kl": False} if fused and beta else {}
    stock, _ = _grpo(GRPOTrainer, tmp_path, loss_type=loss_type, num_iterations=num_iterations, beta=beta, lora=lora,
                     **extra)
    signal, n_fused = _grpo(SignalGRPOTrainer, tmp_path, loss_type=loss_type, num_iterations=num_iterations,
                            beta=beta, lora=lora, **extra)
    assert (n_fused > 0) == fused
    assert signal_head_calls  # the log-prob path (old / reference log-probs, or the loss) ran Signal's op
    _assert_same_run(stock, signal, GRPO_KEYS)


# --- DPO ---------------------------------------------------------------------------------------------

def _dpo(cls, tmp_path, *, loss_type, use_weighting=False):
    from trl import DPOConfig

    torch.manual_seed(0)
    model = tiny_model("qwen2", vocab=BYTE_VOCAB)
    model.train()
    args = DPOConfig(output_dir=str(tmp_path / cls.__name__), per_device_train_batch_size=2, loss_type=[loss_type],
                     use_weighting=use_weighting, beta=0.5, max_length=32, **COMMON)
    ds = Dataset.from_dict({
        "prompt": ["say a", "count", "hi", "sum 1"], "chosen": [" aaa", " 1 2 3", " hello", " 2"],
        "rejected": [" b", " 3 2", " bye now", " 17 x"],
    })
    trainer = cls(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=ds,
                  processing_class=_tokenizer("right"))
    spy = _HeadSpy(trainer.model)
    trainer.train()
    spy.handle.remove()
    assert not spy.lengths  # the loss never calls the head module: no logits at all
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, _weights(trainer.model)


DPO_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")


@pytest.mark.parametrize("loss_type,use_weighting", [("sigmoid", False), ("ipo", False), ("sigmoid", True)],
                         ids=["sigmoid", "ipo", "sigmoid-wpo"])
def test_dpo_trainer_matches_stock(tmp_path, signal_head_calls, loss_type, use_weighting):
    from trl import DPOTrainer

    stock = _dpo(DPOTrainer, tmp_path, loss_type=loss_type, use_weighting=use_weighting)
    assert not signal_head_calls
    signal = _dpo(SignalDPOTrainer, tmp_path, loss_type=loss_type, use_weighting=use_weighting)
    assert len(signal_head_calls) >= 4  # policy and reference, every step
    _assert_same_run(stock, signal, DPO_KEYS)


# --- SFT ---------------------------------------------------------------------------------------------

def _sft(cls, tmp_path):
    from trl import SFTConfig

    torch.manual_seed(0)
    model = tiny_model("gpt2", vocab=BYTE_VOCAB)
    model.train()
    args = SFTConfig(output_dir=str(tmp_path / cls.__name__), per_device_train_batch_size=2, max_length=32,
                     gradient_accumulation_steps=2, **COMMON)
    ds = Dataset.from_dict({"text": ["hello world", "ab", "a much longer line of text", "xyz", "1 2 3 4", "q"]})
    trainer = cls(model=model, args=args, train_dataset=ds, processing_class=_tokenizer("right"))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, _weights(trainer.model)


def test_sft_trainer_matches_stock(tmp_path, signal_head_calls):
    from trl import SFTTrainer

    stock = _sft(SFTTrainer, tmp_path)
    signal = _sft(SignalSFTTrainer, tmp_path)
    assert signal_head_calls
    _assert_same_run(stock, signal, ("loss", "entropy", "mean_token_accuracy"))


# --- the head itself ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_fused_head_fields_equal_trl(arch):
    """Every field of TRL's fused-head output, Signal's vs TRL's (gemma2's soft-capping: TRL's head is kept)."""
    from trl.trainer.utils import add_fused_lm_head

    from signalrl.integrations.trainers import install_fused_head

    from ._models import padded_batch

    outputs = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    stock = tiny_model(arch)
    add_fused_lm_head(stock, temperature=0.7, outputs=outputs)
    signal = copy.deepcopy(stock)
    install_fused_head(signal, temperature=0.7, outputs=outputs)
    ids, attn, labels = padded_batch()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    for extra in ({}, {"num_items_in_batch": torch.tensor(9)}, {"shift_labels": shift}):
        a = stock(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True, **extra)
        b = signal(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True, **extra)
        for name in ("loss", "label_mask", *outputs):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{name}: {m}")
        ga = torch.autograd.grad(a.loss + a.entropy.sum(), list(stock.parameters()), allow_unused=True)
        gb = torch.autograd.grad(b.loss + b.entropy.sum(), list(signal.parameters()), allow_unused=True)
        for x, y in zip(ga, gb):
            if x is not None:
                torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    # without fused_lm_head: the stock forward (logits), e.g. for generation
    assert signal(input_ids=ids, attention_mask=attn).logits.shape[-1] == stock.config.vocab_size


def test_patch_and_trl_head_compose():
    """A model patched before a TRL trainer wraps it: TRL's fused-head calls pass through the patch untouched."""
    from trl.trainer.utils import add_fused_lm_head

    from signalrl.integrations import patch
    from signalrl.integrations.trainers import install_fused_head

    from ._models import padded_batch

    ids, attn, labels = padded_batch()
    plain = tiny_model("llama")
    add_fused_lm_head(plain)
    want = plain(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    model = patch(tiny_model("llama"))
    add_fused_lm_head(model)
    got = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(got.log_probs, want.log_probs, rtol=1e-5, atol=1e-6)
    install_fused_head(model)
    again = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(again.loss, want.loss, rtol=1e-5, atol=0)
    stock = tiny_model("llama")(input_ids=ids, attention_mask=attn, labels=labels)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=attn, labels=labels).loss, stock.loss,
                               rtol=1e-5, atol=0)
