"""A patched model in Hugging Face's Trainer with gradient accumulation ends where the stock one does.

Plain SGD, so equal weights mean equal accumulated gradients (Adam's m/√v would turn 1e-7 relative gradient noise
on near-zero gradient entries into lr-sized differences); micro-batches hold different numbers of label tokens, so
a normalization other than Trainer's num_items_in_batch would move the weights apart.
"""
from __future__ import annotations

import pytest
import torch

from signalrl.integrations import patch

from ._models import VOCAB, tiny_model


class _Rows(torch.utils.data.Dataset):
    """Rows of different lengths (so micro-batches hold different token counts) with a -100 prompt."""

    def __init__(self, n: int = 12, seed: int = 3):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for i in range(n):
            T = 4 + (i * 5) % 9
            ids = torch.randint(4, VOCAB, (T,), generator=g)
            labels = ids.clone()
            labels[: 1 + i % 3] = -100
            self.rows.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _collate(rows):
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    attn = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], attn[i, :n], labels[i, :n] = r["input_ids"], 1, r["labels"]
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def _train(tmp_path, patched: bool, arch: str, lora: bool):
    from transformers import Trainer, TrainingArguments

    model = tiny_model(arch, lora=lora)
    if patched:
        patch(model)
    args = TrainingArguments(
        output_dir=str(tmp_path / ("patched" if patched else "stock")), per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=3, learning_rate=0.5, optim="sgd", use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=1, seed=0, data_seed=0, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(), data_collator=_collate)
    # the patched forward keeps the stock signature, so Trainer passes num_items_in_batch (exact accumulation)
    assert trainer.model_accepts_loss_kwargs
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses


@pytest.mark.parametrize("arch,lora", [("llama", False), ("gpt2", True)], ids=["llama", "gpt2-lora"])
def test_trainer_with_gradient_accumulation_matches_stock(tmp_path, arch, lora):
    w_stock, l_stock = _train(tmp_path, False, arch, lora)
    w_patched, l_patched = _train(tmp_path, True, arch, lora)
    assert len(l_stock) == len(l_patched) == 3
    torch.testing.assert_close(torch.tensor(l_patched), torch.tensor(l_stock), rtol=1e-5, atol=1e-6)
    init = dict(tiny_model(arch, lora=lora).named_parameters())
    for name, w in w_stock.items():
        torch.testing.assert_close(w_patched[name], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert any(not torch.equal(w, init[n]) for n, w in w_stock.items())  # the runs trained something
