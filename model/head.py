"""The LM head that can return the training loss instead of logits.

`install_loss_head(model)` swaps Mixtral's `lm_head` for a `LossHead`: the same module name and the
same weight Parameter (tied or not, so state dicts, checkpoints, ZeRO-3 partitioning and the HF
export are unchanged), and the same `nn.Linear` behaviour everywhere else. Inside
`head.loss_on(labels_BS)` its forward returns Σ cross-entropy over the label positions
(`model.losses.linear_ce_sum`) instead of the (B, S, V) logits, so the stage loops get the loss
from the model's own forward — under the DeepSpeed engine and its ZeRO-3 parameter hooks —
without the logits ever existing:

    head = model.get_output_embeddings()
    with head.loss_on(b["labels"]):
        out = engine(input_ids=..., position_ids=...)
    ce_sum = out.logits          # a 0-d tensor: Σ −log p(label) over the micro-batch's labels
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from model.losses import linear_ce_sum


class LossHead(nn.Linear):
    labels_BS: torch.Tensor | None = None
    shifted: bool = False

    def forward(self, hidden_BSH: torch.Tensor) -> torch.Tensor:
        if self.labels_BS is None:
            return super().forward(hidden_BSH)
        if self.bias is not None:
            raise ValueError("LossHead.loss_on: an LM head with a bias is not supported (Mixtral has none)")
        return linear_ce_sum(hidden_BSH, self.weight, self.labels_BS, shifted=self.shifted)

    @contextlib.contextmanager
    def loss_on(self, labels_BS: torch.Tensor, shifted: bool = False):
        """Within this block the forward returns Σ CE over `labels_BS` (unshifted, IGNORE_INDEX = skip;
        `shifted=True`: already the targets of each position, model/sequence_parallel.py)."""
        self.labels_BS, self.shifted = labels_BS, shifted
        try:
            yield self
        finally:
            self.labels_BS, self.shifted = None, False


def install_loss_head(model) -> LossHead:
    """Replace `model`'s output embedding (an HF causal LM, before any peft or DeepSpeed wrapping) by a
    `LossHead` holding the same weight; returns it."""
    old = model.get_output_embeddings()
    if isinstance(old, LossHead):
        return old
    head = LossHead(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
    head.weight = old.weight
    if old.bias is not None:
        head.bias = old.bias
    model.set_output_embeddings(head)
    return head
