"""The expert kernel of the training step: transformers' grouped-GEMM experts forward, minus its
expert-parallel bookkeeping.

transformers' `grouped_mm` forward serves its own expert parallelism too, where tokens routed to
another rank's experts carry a sentinel id ≥ num_experts; it masks those rows with three
`masked_fill`s over the (top_k·T, 2·ffn) and (top_k·T, hidden) activations in the forward and again in
the backward. Our models never carry sentinels
(expert parallelism is DeepSpeed AutoEP, which swaps in its own MoE modules), so this version drops
them: same sort, same grouped GEMMs, same combine — gradients equal to transformers' (tests/unit/
test_model.py) — 1.2× faster per MoE block fwd+bwd on CPU (146 → 119 ms, BENCHMARKS.md).

Registered as `experts_implementation: sorted_grouped_mm` (the presets' default). A 4-bit expert weight
(`model.quantize=nf4`, model/quantize.py) is dequantized per projection in the forward and again in the
backward, never kept.

Shapes: T tokens, K = top_k, S = T·K token-expert pairs, H hidden, F expert ffn, E experts.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from model.quantize import grouped_linear

NAME = "sorted_grouped_mm"


def sorted_grouped_mm_experts_forward(self, hidden_TH: torch.Tensor, top_k_index_TK: torch.Tensor,
                                      top_k_weights_TK: torch.Tensor) -> torch.Tensor:
    """out[t] = Σ_k w[t,k] · down_e(act(gate_e(x_t)) ⊙ up_e(x_t)), e = top_k_index[t,k], with the S pairs
    sorted by expert so each projection is one grouped GEMM over contiguous row blocks."""
    num_tokens, top_k = top_k_index_TK.shape
    expert_ids_S, perm_S = torch.sort(top_k_index_TK.reshape(-1))
    x_SH = hidden_TH[perm_S // top_k]
    counts_E = torch.bincount(expert_ids_S, minlength=self.num_experts)
    rows_S = None
    if hidden_TH.device.type == "cpu" and hidden_TH.dtype in (torch.bfloat16, torch.float16):
        x_SH, counts_E, rows_S = _pad_groups(x_SH, expert_ids_S, counts_E)
    offsets_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
    if self.has_gate:
        h_SF = self._apply_gate(grouped_linear(x_SH, self.gate_up_proj, offsets_E, self.is_transposed, _adapter(self, "gate_up_proj")))
    else:
        h_SF = self.act_fn(grouped_linear(x_SH, self.up_proj, offsets_E, self.is_transposed, _adapter(self, "up_proj")))
    y_SH = grouped_linear(h_SF, self.down_proj, offsets_E, self.is_transposed, _adapter(self, "down_proj"))
    if rows_S is not None:
        y_SH = y_SH.index_select(0, rows_S)
    y_SH = y_SH * top_k_weights_TK.reshape(-1)[perm_S].unsqueeze(-1)
    inv_perm_S = torch.argsort(perm_S)
    return y_SH[inv_perm_S].view(num_tokens, top_k, -1).sum(dim=1).to(hidden_TH.dtype)


def _adapter(experts, name: str):
    """The per-expert adapter of 4-bit weight `name` (`experts.adapters[name]`, model/lora.py), or None."""
    adapters = experts._modules.get("adapters")
    return adapters[name] if adapters is not None and name in adapters else None


CPU_ROW_BLOCK = 64


def _pad_groups(x_SH: torch.Tensor, expert_ids_S: torch.Tensor, counts_E: torch.Tensor):
    """16-bit on CPU: each expert's block of rows padded with zero rows to a multiple of `CPU_ROW_BLOCK`.

    oneDNN, which runs CPU bf16 matmuls, compiles a kernel for every new matrix shape (measured: a first call
    0.65 ms against 0.09 ms once compiled, and ~27 MB of RSS per 1k shapes kept), and an expert's row count
    changes with every batch; rounded up, the same few shapes recur. A zero row gives zero outputs and adds
    nothing to the weight gradients, and the real rows' outputs are taken back. Returns (padded x, padded
    counts, the padded row of each real row)."""
    padded_E = (counts_E + CPU_ROW_BLOCK - 1) // CPU_ROW_BLOCK * CPU_ROW_BLOCK
    shift_E = (torch.cumsum(padded_E, 0) - padded_E) - (torch.cumsum(counts_E, 0) - counts_E)
    rows_S = torch.arange(x_SH.shape[0], device=x_SH.device) + shift_E[expert_ids_S]
    padded = x_SH.new_zeros(int(padded_E.sum()), x_SH.shape[1]).index_copy(0, rows_S, x_SH)
    return padded, padded_E, rows_S


ALL_EXPERTS_FUNCTIONS.register(NAME, sorted_grouped_mm_experts_forward)
