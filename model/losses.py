"""Token and preference losses.

Shapes: B batch rows, S sequence length, V vocabulary, N selected tokens.

`token_ce_sum` returns a *sum* and a count, not a mean: the stage loops divide by the number
of label tokens in the whole global batch (all micro-batches, all data-parallel ranks), which is
the only normalisation that is exact under gradient accumulation and data parallelism with
rows of different label counts (a per-micro-batch mean over-weights short micro-batches).

`dpo_loss` follows the papers and TRL's DPOTrainer:
    h = (log π(y_w|x) − log π(y_l|x)) − (log π_ref(y_w|x) − log π_ref(y_l|x))
    sigmoid (DPO, Rafailov et al. 2023, eq. 7):  −log σ(β h)·(1−ε) − log σ(−β h)·ε   (ε = label smoothing, cDPO)
    robust  (Chowdhury et al. 2024, eq. 21):     (−log σ(β h)·(1−ε) + log σ(−β h)·ε) / (1 − 2ε)
    hinge   (SLiC, Zhao et al. 2023):            max(0, 1 − β h)
    ipo     (Azar et al. 2023, eq. 17):          (h − 1/(2β))²   (log-probs averaged over tokens, not summed)
    rewards: β (log π(y|x) − log π_ref(y|x)) for chosen and rejected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_ce_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies over label positions, and their count.

    labels are unshifted (labels[b, i] is the token at position i); position i-1 predicts it.
    Two ways to the same sum:
    * mostly labelled fp32 logits (pretraining): cross-entropy straight on the (B·S, V) view with the
      targets shifted left and `ignore_index` — no copy of the logits, no scatter in backward;
    * otherwise (SFT answers, bf16): only the N labelled positions are gathered and upcast to fp32,
      so the log-softmax runs over N rows and the (B, S, V) logits are never copied in fp32 whole.
    """
    targets_BS = labels_BS[:, 1:]
    sel_BS = targets_BS != IGNORE_INDEX
    n = sel_BS.sum()
    if logits_BSV.dtype == torch.float32 and 2 * int(n) > sel_BS.numel():
        shifted_BS = F.pad(targets_BS, (0, 1), value=IGNORE_INDEX)  # the last position predicts nothing
        total = F.cross_entropy(logits_BSV.flatten(0, 1), shifted_BS.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="sum")
        return total, n
    logits_NV = logits_BSV[:, :-1][sel_BS].float()
    total = F.cross_entropy(logits_NV, targets_BS[sel_BS], reduction="sum")
    return total, n


def sequence_logps(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of log p(label) over label positions `(B,)`, and the per-row label count `(B,)`."""
    targets_BS = labels_BS[:, 1:]
    mask_BS = targets_BS != IGNORE_INDEX
    safe_BS = targets_BS.masked_fill(~mask_BS, 0)
    logp_BS = torch.gather(logits_BSV[:, :-1].float().log_softmax(-1), 2, safe_BS.unsqueeze(-1)).squeeze(-1)
    return (logp_BS * mask_BS).sum(-1), mask_BS.sum(-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO-family losses and implicit rewards, all `(B,)`.

    For `ipo`, pass log-probs averaged over response tokens (as the IPO paper and TRL do).
    """
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * h) * (1 - label_smoothing) + F.logsigmoid(-beta * h) * label_smoothing) / (
            1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: expected sigmoid, robust, hinge or ipo")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
