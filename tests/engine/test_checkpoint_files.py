"""Checkpoint files: a pickle-free format, replaced atomically (a failure mid-write leaves the previous one)."""
import json
import os

import pytest
import torch

from signalrl.engine import checkpoint


def _write(path, value, **kw):
    p = torch.nn.Parameter(torch.full((3,), float(value)))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones(3)
    opt.step()
    return checkpoint.write_checkpoint(
        str(path), tensors={"w": torch.full((3,), float(value))}, optimizer=opt.state_dict(), scheduler=None,
        rng=checkpoint.capture_rng(torch.Generator()), state={"step": value}, **kw)


def test_roundtrip_and_replace(tmp_path):
    p = tmp_path / "ck"
    _write(p, 1)
    _write(p, 2)
    got = checkpoint.read_checkpoint(str(p), "cpu")
    assert got["state"]["step"] == 2 and torch.equal(got["tensors"]["w"], torch.full((3,), 2.0))
    assert got["optimizer"]["param_groups"][0]["params"] == [0]
    assert set(got["optimizer"]["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert got["rng"]["sampling"].dtype == torch.uint8 and len(got["rng"]["python"][1]) == 625
    entries = sorted(os.listdir(tmp_path))  # the name and the one version it points to: nothing left over
    assert entries == sorted(["ck", os.readlink(p)]) and os.path.islink(p)
    assert sorted(os.listdir(p)) == sorted(checkpoint.FILES)


def test_no_pickle_in_the_format(tmp_path):
    """Tensors are safetensors, everything else JSON."""
    _write(tmp_path / "ck", 3)
    for name in checkpoint.FILES:
        data = (tmp_path / "ck" / name).read_bytes()
        if name.endswith(".json"):
            json.loads(data)
        else:
            assert name.endswith(".safetensors")
        assert b"\x80\x02" not in data[:2] and b"\x80\x04" not in data[:2]  # no pickle protocol header


def test_crash_during_write_keeps_previous(tmp_path, monkeypatch):
    p = tmp_path / "ck"
    _write(p, 1)
    real_save = checkpoint.save_file
    calls = []

    def failing_save(tensors, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:  # after the weights: simulate a failure
            raise OSError("disk full")
        return real_save(tensors, f, *a, **k)

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        _write(p, 2)
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    got = checkpoint.read_checkpoint(str(p), "cpu")
    assert got["state"]["step"] == 1 and torch.equal(got["tensors"]["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == sorted(["ck", os.readlink(p)])


def test_clean_leftovers(tmp_path):
    p = tmp_path / "ck"
    _write(p, 1)
    keep = os.readlink(p)
    (tmp_path / ".v-0123456789ab").mkdir()  # an interrupted save's version
    (tmp_path / ".v-0123456789ab" / "weights.safetensors").write_bytes(b"x")
    os.symlink(".v-0123456789ab", tmp_path / ".link-0123456789ab")
    (tmp_path / ".tmp-ck-deadbeef").mkdir()  # format 1's scheme
    (tmp_path / ".old-ck-deadbeef").mkdir()
    (tmp_path / ".old-gone-cafebabe").mkdir()  # format 1 died between its renames: the only copy of 'gone'
    (tmp_path / "user-notes.txt").write_text("mine")
    removed = checkpoint.clean_leftovers(str(tmp_path))
    assert sorted(removed) == [".link-0123456789ab", ".old-ck-deadbeef", ".old-gone-cafebabe", ".tmp-ck-deadbeef",
                               ".v-0123456789ab"]
    assert sorted(os.listdir(tmp_path)) == sorted(["ck", keep, "gone", "user-notes.txt"])
    assert checkpoint.read_checkpoint(str(p))["state"]["step"] == 1


def test_incomplete_directory_is_rejected(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="incomplete"):
        checkpoint.read_checkpoint(str(tmp_path / "half"), "cpu")


def test_unstorable_optimizer_value_fails_before_the_disk(tmp_path):
    sd = {"state": {0: {"weird": object()}}, "param_groups": [{"params": [0], "lr": 1.0}]}
    with pytest.raises(TypeError, match="weird"):
        checkpoint.write_checkpoint(str(tmp_path / "ck"), tensors={}, optimizer=sd, scheduler=None,
                                    rng=checkpoint.capture_rng(None), state={"step": 0})
    assert os.listdir(tmp_path) == []


def test_existing_non_checkpoint_is_left_alone(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="left as it is"):
        _write(tmp_path / "ck", 1)
    assert (tmp_path / "ck" / "mine.txt").read_text() == "keep"
