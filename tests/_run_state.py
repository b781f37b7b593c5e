"""A run's whole mutable state, bit for bit: what a failed request must leave exactly as it was.

Importable from any test (tests/ is on sys.path through its conftest.py): ``from _run_state import snapshot``.
"""
import torch


def snapshot(run):
    params = {n: p.detach().clone() for n, p in run.trainable_parameters()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in run.trainable_parameters()}
    opt = run.optimizer.state_dict()
    opt_state = {k: {kk: vv.clone() if torch.is_tensor(vv) else vv for kk, vv in v.items()}
                 for k, v in opt["state"].items()}
    frozen = {n: p.detach().clone() for n, p in run.model.named_parameters() if not p.requires_grad}
    return {"params": params, "grads": grads, "opt": opt_state, "groups": len(run.optimizer.param_groups),
            "heads": list(run.heads), "frozen": frozen, "step": run.step,
            "lrs": [g["lr"] for g in run.optimizer.param_groups], "pending": run.pending_grads,
            "sched": {k: v for k, v in run.scheduler.state_dict().items() if k != "lr_lambdas"},
            "rng": run._rng_state.clone()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in ("params", "grads", "frozen"):
        assert a[key].keys() == b[key].keys(), key
        for n in a[key]:
            x, y = a[key][n], b[key][n]
            assert (x is None) == (y is None), (key, n)
            if x is not None:
                assert torch.equal(x, y), (key, n)  # bit-exact
    assert a["opt"].keys() == b["opt"].keys()
    for k in a["opt"]:
        for kk in a["opt"][k]:
            x, y = a["opt"][k][kk], b["opt"][k][kk]
            assert torch.equal(x, y) if torch.is_tensor(x) else x == y
    for key in ("groups", "heads", "step", "lrs", "pending", "sched"):
        assert a[key] == b[key], key
    assert torch.equal(a["rng"], b["rng"])
