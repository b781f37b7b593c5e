"""token_logprobs (± entropy) from logits ``[N, V]``.

Work model: bandwidth. Forward reads the logits once; backward reads them once more and writes the
``[N, V]`` gradient (see ``runner.traffic_bytes``).
"""

from __future__ import annotations

import torch

from . import Case, Preset, randint, randn, standard_impls

IGNORE = -100


def _shapes(preset: Preset):
    """(params, dtype, headline) points; sweeps over V at fixed N and over N at fixed V."""
    if preset.quick:
        return [({"N": 64, "V": 500}, torch.float32, True), ({"N": 64, "V": 1000}, torch.float32, False)]
    if preset.name == "cpu":
        pts = [({"N": 512, "V": 32000}, torch.float32, True), ({"N": 512, "V": 32000}, torch.bfloat16, True)]
        pts += [({"N": 64, "V": v}, torch.float32, False) for v in (32000, 128256, 262144)]
        pts += [({"N": n, "V": 32000}, torch.float32, False) for n in (128, 1024)]
        return pts
    pts = [({"N": 8192, "V": 128256}, torch.bfloat16, True)]
    pts += [({"N": 8192, "V": v}, torch.bfloat16, False) for v in (32000, 151936, 262144)]
    pts += [({"N": n, "V": 128256}, torch.bfloat16, False) for n in (1024, 4096, 16384, 32768)]
    return pts


def _maker(N, V, dtype):
    def make(device, gen):
        logits = randn((N, V), device, gen, dtype=dtype, scale=2.0, requires_grad=True)
        targets = randint(V, (N,), device, gen)
        targets[::16] = IGNORE  # some ignored positions, as in padded batches
        return {"logits": logits, "targets": targets}

    return make


def cases(preset: Preset) -> list[Case]:
    out = []
    for entropy in (False, True):
        op = "token_logprobs+entropy" if entropy else "token_logprobs"

        def call(m, logits, targets, _e=entropy):
            return m.token_logprobs(logits, targets, ignore_index=IGNORE, return_entropy=_e)

        for params, dtype, headline in _shapes(preset):
            if entropy and preset.name == "cpu" and (dtype != torch.float32 or (not headline and params["N"] != 64)):
                continue  # CPU: the entropy variant at the fp32 headline and along the V sweep
            if entropy and not headline and preset.name != "cpu":
                continue  # quick / GPU: the entropy variant at the headline shape
            out.append(Case(
                op=op, family="logprobs", params=dict(params), dtype=dtype,
                make=_maker(params["N"], params["V"], dtype),
                impls=standard_impls("token_logprobs", call, "logits", preset, headline=headline,
                                     compile_key=op),
                headline=headline,
            ))
    return out
