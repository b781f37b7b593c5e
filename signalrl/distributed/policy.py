"""The policy on a sharded model: FSDP2 root module and the data-parallel :class:`DistributedPolicy`.

Exactness by construction. The losses are called with the *global* batch on every rank. Every model pass the
loss asks for (log-probs, entropy, values, rewards, reference log-probs) runs only on this rank's rows, inside
the FSDP2 root module's forward (so the LM head, tied to the embeddings, and the final norm are gathered there
and the fused ``linear_token_logprobs`` op reads the full ``[V, H]`` head without materializing ``[N, V]``
logits), and its per-token results ``[b, T]`` are all-gathered into the global ``[B, T]`` tensors. The loss
then runs unchanged and identically on every rank: every normalization (token means, sequence means,
advantage normalization, whitening, explained variance, GRPO groups wherever their rows landed) and every
metric is the global one. The backward of the gather hands each rank the gradient of its own rows; FSDP2's
reduce-scatter *sums* the ranks' parameter gradients (divide factor 1), which is the gradient of the global
loss.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from signalrl.losses.model import PolicyModel, last_token_index

from .comm import Comm, gather_rows


class ShardRoot(nn.Module):
    """The FSDP2 root: owns the causal LM (plain or peft). Every computation that touches root-level parameters
    (embeddings, final norm, LM head) is one ``forward(kind, ...)`` call, so FSDP2 gathers them around it.
    Heads are replicated outside the module tree (``heads``: a dict the run keeps current)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.heads: dict[str, nn.Module] = {}

    def _policy(self, with_heads: bool = True) -> PolicyModel:
        return PolicyModel(self.model, value_head=self.heads.get("value") if with_heads else None,
                           reward_head=self.heads.get("reward") if with_heads else None)

    def forward(self, kind: str, *args: Any, **kwargs: Any) -> Any:
        pol = self._policy()
        if kind == "policy":  # (ids, attn, **forward kwargs) -> (logprobs, entropy, values, hidden)
            ids, attn = args
            out = pol.forward(ids, attn, **kwargs)
            return out.logprobs, out.entropy, out.values, out.hidden
        if kind == "hidden":  # (ids, attn) -> hidden [b, T, H]
            return pol.hidden_states(*args)
        if kind == "values":  # (hidden,) -> values [b, T]
            return pol.values_from_hidden(*args)
        if kind == "rewards":  # (ids, attn) -> [b]
            ids, attn = args
            hidden = pol.hidden_states(ids, attn)
            idx = last_token_index(attn)
            return pol.reward_head(hidden[torch.arange(hidden.shape[0], device=hidden.device), idx])
        if kind == "lm":  # the causal LM's own forward (sampling)
            return self.model(*args, **kwargs)
        raise ValueError(f"kind: unknown root computation {kind!r}")


class _LocalHidden:
    """Hidden states of this rank's rows (what ``hidden_states`` returns on a sharded policy): opaque to the
    losses, which only pass it back to ``forward``/``values_from_hidden``."""

    __slots__ = ("local", "counts")

    def __init__(self, local: Tensor, counts: list[int]):
        self.local = local
        self.counts = counts


class DistributedPolicy(PolicyModel):
    """A :class:`PolicyModel` whose passes run on this rank's rows and return global tensors."""

    def __init__(self, root: ShardRoot, comm: Comm, *, reference_model=None, split=None):
        super().__init__(root.model, reference_model=reference_model, value_head=root.heads.get("value"),
                         reward_head=root.heads.get("reward"))
        self._root = [root]  # a list keeps it out of this module's tree
        self._comm = comm
        self._split = split

    # the fused PPO loss aggregates over the tokens it sees: on a shard that would be a local normalization,
    # so the policy objective takes the composed path (fused linear_token_logprobs + global elementwise math)
    def _fused(self) -> bool:
        return False

    def _rows(self, n: int) -> tuple[list[int], slice]:
        counts = self._comm.row_counts(n, self._split(n) if callable(self._split) else self._split)
        lo = sum(counts[:self._comm.rank])
        n_local = counts[self._comm.rank]
        # a rank without rows still joins every FSDP collective: it computes row 0 and contributes no rows
        return counts, (slice(lo, lo + n_local) if n_local else slice(0, 1))

    def _gather(self, x: Tensor | None, counts: list[int]) -> Tensor | None:
        return None if x is None else gather_rows(self._comm, x, counts)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *, labels: Tensor | None = None,
                with_entropy: bool = False, with_values: bool = False, with_hidden: bool = False,
                temperature: float = 1.0, hidden=None):
        from signalrl.losses.model import PolicyOutput

        counts, sl = self._rows(input_ids.shape[0])
        root = self._root[0]
        kw = dict(labels=None if labels is None else labels[sl], with_entropy=with_entropy, with_values=with_values,
                  with_hidden=with_hidden, temperature=temperature,
                  hidden=hidden.local if isinstance(hidden, _LocalHidden) else None)
        lp, ent, values, h = root("policy", input_ids[sl], attention_mask[sl], **kw)
        out = PolicyOutput(logprobs=self._gather(lp, counts), entropy=self._gather(ent, counts),
                           values=self._gather(values, counts))
        if with_hidden:
            out.hidden = _LocalHidden(h, counts)
        return out

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor):
        counts, sl = self._rows(input_ids.shape[0])
        return _LocalHidden(self._root[0]("hidden", input_ids[sl], attention_mask[sl]), counts)

    def values_from_hidden(self, hidden) -> Tensor:
        if self.value_head is None:
            return super().values_from_hidden(None)  # raises the explanation
        if not isinstance(hidden, _LocalHidden):
            raise TypeError("a sharded policy's values_from_hidden takes what its hidden_states returned")
        return self._gather(self._root[0]("values", hidden.local), hidden.counts)

    def values(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.forward(input_ids, attention_mask, with_values=True).values

    def sequence_rewards(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self.reward_head is None:
            return super().sequence_rewards(input_ids, attention_mask)  # raises the explanation
        counts, sl = self._rows(input_ids.shape[0])
        return self._gather(self._root[0]("rewards", input_ids[sl], attention_mask[sl]), counts)

    @torch.no_grad()
    def reference_logprobs(self, input_ids: Tensor, attention_mask: Tensor, *, reference_model=None,
                           temperature: float = 1.0, labels: Tensor | None = None) -> Tensor:
        ref = reference_model if reference_model is not None else self.reference_model
        counts, sl = self._rows(input_ids.shape[0])
        lab = None if labels is None else labels[sl]
        if ref is not None:  # a replicated frozen model (not sharded): run it on this rank's rows
            local = PolicyModel(ref).token_logprobs(input_ids[sl], attention_mask[sl], temperature=temperature,
                                                    labels=lab)
        elif hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                local = self._root[0]("policy", input_ids[sl], attention_mask[sl], labels=lab,
                                      temperature=temperature)[0]
        else:
            return super().reference_logprobs(input_ids, attention_mask)  # raises the explanation
        return self._gather(local, counts)
