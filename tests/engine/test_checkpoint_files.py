"""Checkpoints are written atomically: a failure mid-write leaves the previous checkpoint intact."""
import os

import pytest
import torch

from signalrl.engine import checkpoint


def _write(path, value):
    return checkpoint.write_checkpoint(
        str(path), tensors={"w": torch.full((3,), float(value))}, optimizer={"state": {}, "param_groups": []},
        scheduler=None, rng=checkpoint.capture_rng(None), state={"step": value})


def test_roundtrip_and_replace(tmp_path):
    p = tmp_path / "ck"
    _write(p, 1)
    _write(p, 2)
    got = checkpoint.read_checkpoint(str(p), "cpu")
    assert got["state"]["step"] == 2 and torch.equal(got["tensors"]["w"], torch.full((3,), 2.0))
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary or old directories left


def test_crash_during_write_keeps_previous(tmp_path, monkeypatch):
    p = tmp_path / "ck"
    _write(p, 1)
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:  # after the weights and optimizer began: simulate a crash
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        _write(p, 2)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    got = checkpoint.read_checkpoint(str(p), "cpu")
    assert got["state"]["step"] == 1 and torch.equal(got["tensors"]["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_incomplete_directory_is_rejected(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="incomplete"):
        checkpoint.read_checkpoint(str(tmp_path / "half"), "cpu")
