"""The expert kernel of the training step: transformers' grouped-GEMM experts forward, minus its
expert-parallel bookkeeping.

transformers' `grouped_mm` forward serves its own expert parallelism too, where tokens routed to
another rank's experts carry a sentinel id ≥ num_experts; it masks those rows with three
`masked_fill`s over the (top_k·T, 2·ffn) and (top_k·T, hidden) activations in the forward and again in
the backward. Our models never carry sentinels
(expert parallelism is DeepSpeed AutoEP, which swaps in its own MoE modules), so this version drops
them: same sort, same grouped GEMMs, same combine — gradients equal to transformers' (tests/unit/
test_model.py) — 1.2× faster per MoE block fwd+bwd on CPU (146 → 119 ms, BENCHMARKS.md).

Registered as `experts_implementation: sorted_grouped_mm` (the presets' default).

Shapes: T tokens, K = top_k, S = T·K token-expert pairs, H hidden, F expert ffn, E experts.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _grouped_linear

NAME = "sorted_grouped_mm"


def sorted_grouped_mm_experts_forward(self, hidden_TH: torch.Tensor, top_k_index_TK: torch.Tensor,
                                      top_k_weights_TK: torch.Tensor) -> torch.Tensor:
    """out[t] = Σ_k w[t,k] · down_e(act(gate_e(x_t)) ⊙ up_e(x_t)), e = top_k_index[t,k], with the S pairs
    sorted by expert so each projection is one grouped GEMM over contiguous row blocks."""
    num_tokens, top_k = top_k_index_TK.shape
    expert_ids_S, perm_S = torch.sort(top_k_index_TK.reshape(-1))
    x_SH = hidden_TH[perm_S // top_k]
    counts_E = torch.bincount(expert_ids_S, minlength=self.num_experts)
    offsets_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
    if self.has_gate:
        h_SF = self._apply_gate(_grouped_linear(x_SH, self.gate_up_proj, offsets_E, is_transposed=self.is_transposed))
    else:
        h_SF = self.act_fn(_grouped_linear(x_SH, self.up_proj, offsets_E, is_transposed=self.is_transposed))
    y_SH = _grouped_linear(h_SF, self.down_proj, offsets_E, is_transposed=self.is_transposed)
    y_SH = y_SH * top_k_weights_TK.reshape(-1)[perm_S].unsqueeze(-1)
    inv_perm_S = torch.argsort(perm_S)
    return y_SH[inv_perm_S].view(num_tokens, top_k, -1).sum(dim=1).to(hidden_TH.dtype)


ALL_EXPERTS_FUNCTIONS.register(NAME, sorted_grouped_mm_experts_forward)
