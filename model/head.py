"""Mixtral's LM head, callable for logits or for the training loss.

`install_lm_head(model)` swaps the model's `lm_head` (an `nn.Linear`) for an `LMHead`: the same module
name and the same weight Parameter (tied or not), so state dicts, checkpoints, ZeRO-3 partitioning and
the HF export are unchanged. It is an `nn.Linear` with one more, optional argument:

    head(hidden_BSH)              → logits (B, S, V), exactly nn.Linear (generation, eval, the model's forward)
    head(hidden_BSH, targets_BS)  → Σ over positions with a target of −log softmax(hidden · Wᵀ)[target], a 0-d
                                    fp32 tensor; the (B, S, V) logits never exist (model.losses.linear_ce_sum)
    head(hidden_BSH, targets_BS, per_token=True)
                                  → log softmax(hidden · Wᵀ)[target] at each position with a target, (N,) fp32
                                    (model.losses.linear_logps: DPO's answer log-probs, logits never whole)

The stage loops take the final hidden states from the model and call `model.losses.causal_lm_loss`,
which calls the head with targets:

    out = engine(input_ids=..., position_ids=..., output_hidden_states=True, logits_to_keep=NO_LOGITS)
    ce_sum = causal_lm_loss(out.hidden_states[-1], head, targets_BS)

DPO takes the final hidden states from a hook (`final_hidden`: its no-grad reference forward would otherwise
keep every layer's hidden states) and calls `model.losses.token_logps`.

The loss is a call of the head *module* (not a function of its weight) so that DeepSpeed ZeRO-3's module
hooks gather a partitioned weight for it and reduce its gradient, as for any other layer. `NO_LOGITS`
(`logits_to_keep` = no position) makes the model's own head call compute nothing.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from model.losses import linear_ce_sum, linear_logps

NO_LOGITS = torch.empty(0, dtype=torch.long)  # logits_to_keep for a forward whose loss the head computes


class LMHead(nn.Linear):
    def forward(self, hidden_BSH: torch.Tensor, targets_BS: torch.Tensor | None = None,
                per_token: bool = False) -> torch.Tensor:
        """Logits (B, S, V) without `targets_BS`; with them (targets_BS[b, i] = the token position i predicts,
        IGNORE_INDEX = none), Σ cross-entropy over the positions that have one, or with `per_token` each one's
        log-probability `(N,)`."""
        if targets_BS is None:
            return super().forward(hidden_BSH)
        if self.bias is not None:
            raise ValueError("LMHead: a loss through an LM head with a bias is not supported (Mixtral has none)")
        if per_token:
            return linear_logps(hidden_BSH, self.weight, targets_BS)
        return linear_ce_sum(hidden_BSH, self.weight, targets_BS, shifted=True)


def install_lm_head(model) -> LMHead:
    """Replace `model`'s output embedding (an HF causal LM, before any peft or DeepSpeed wrapping) by an
    `LMHead` holding the same weight; returns it."""
    old = model.get_output_embeddings()
    if isinstance(old, LMHead):
        return old
    head = LMHead(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
    head.weight = old.weight
    if old.bias is not None:
        head.bias = old.bias
    model.set_output_embeddings(head)
    return head


@contextlib.contextmanager
def final_hidden(model):
    """`with final_hidden(model) as hidden: model(...)`, then `hidden[0]` is the forward's final hidden states
    (B, S, H): the output of the decoder's last norm, what the LM head reads. `model` may be wrapped (peft,
    a DeepSpeed engine). Unlike `output_hidden_states=True` it keeps no other layer's hidden states."""
    norm = model.get_decoder().norm  # peft and DeepSpeed's engine hand unknown attributes to the model they wrap
    hidden: list[torch.Tensor] = []
    handle = norm.register_forward_hook(lambda _module, _inputs, output: hidden.append(output))
    try:
        yield hidden
    finally:
        handle.remove()
