"""Tiny random causal LMs (no downloads) shared by the integration tests."""
from __future__ import annotations

import torch

VOCAB = 320
ARCHS = ("llama", "qwen2", "mistral", "gpt2", "gemma2")


def tiny_config(arch: str, vocab: int = VOCAB):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "gpt2":  # tied head
        return tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if arch == "gemma2":  # final-logit soft-capping: the fused path falls back
        return tf.Gemma2Config(**common, head_dim=8, final_logit_softcapping=30.0, query_pre_attn_scalar=8)
    raise ValueError(arch)


def tiny_model(arch: str, *, lora: bool = False, seed: int = 0, vocab: int = VOCAB):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab), attn_implementation="eager").float()
    model.eval()  # no dropout: two passes must see the same function
    if lora:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(model, cfg)
    return model


def padded_batch(B: int = 3, T: int = 10, vocab: int = VOCAB, seed: int = 1):
    """Right-padded ids, a left-padded row, and labels with -100 on padding and on a prompt prefix."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[0, T - 3:] = 0  # right padding
    attn[1, :2] = 0  # left padding
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :3] = -100  # a prompt that does not count
    return ids, attn, labels
