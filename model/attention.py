"""Attention for packed training rows on CPU: each document attends to itself only, computed per document.

Our packed rows hold many documents (data/dataset.py: positions restart at 0 for each). transformers'
`sdpa` turns that into a (B, 1, S, S) block-diagonal causal mask, and the CPU flash kernel then scores
every query against all S keys of its row and masks most of them away: for the embedded curriculum
(median document 14 tokens in 512-token rows) 88% of the scores are thrown away (E[L²] / (E[L]·S)). Here
each document attends over its own span only, in a causal SDPA call (`is_causal=True`, so the kernel also
skips the upper triangle), which gives the same result as the masked call (tests/unit/test_model.py).
Documents are batched by length (powers of two), so a row of 40 short documents costs a handful of
SDPA calls, not 40.

Used only where it pays and is exact: training mode, on CPU, no KV cache (query length = key length),
`position_ids` given, and more than one document in the batch; everything else (generation, eval,
GPUs — where `flash_attention_2` does the same through `position_ids` — single documents) goes to
transformers' `sdpa` unchanged. Registered as `attn_implementation: packed_sdpa` (the default).

Shapes: B rows, S positions, Hq query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "packed_sdpa"
# Set by model/sequence_parallel.py: rows gathered by the sequence-parallel attention arrive without a mask,
# so documents are kept apart here, by position ids, on every device and outside training too.
PER_DOCUMENT_ALWAYS = [False]


def splits_documents_on(device: torch.device) -> bool:
    """Where training rows take the per-document kernels below: the CPU. Elsewhere (GPUs) they take transformers'
    `sdpa` with the block-diagonal mask it derives from the restarting `position_ids` (tests/unit/test_packing.py
    forces that path on the CPU and checks that documents stay apart)."""
    return device.type == "cpu"


def document_spans(position_ids_BS: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) spans of its documents: a new one wherever the position does not
    continue the previous one (a restart at 0, or padding)."""
    new_BS = torch.ones_like(position_ids_BS, dtype=torch.bool)
    new_BS[:, 1:] = position_ids_BS[:, 1:] != position_ids_BS[:, :-1] + 1
    spans = []
    for row in new_BS.cpu():
        starts = torch.nonzero(row).flatten().tolist() + [row.numel()]
        spans.append(list(zip(starts[:-1], starts[1:])))
    return spans


def length_buckets(spans: list[list[tuple[int, int]]], seq_len: int, min_len: int = 16) -> dict[int, torch.Tensor]:
    """Documents grouped by their length rounded up to a power of two L: {L: (n, L) flat token indices
    b·S + position}, each document right-padded by repeating its last index."""
    by_len: dict[int, list[list[int]]] = {}
    for b, row in enumerate(spans):
        for s, e in row:
            bucket = max(min_len, 1 << (e - s - 1).bit_length())
            first = b * seq_len + s
            by_len.setdefault(bucket, []).append([first + min(i, e - s - 1) for i in range(bucket)])
    return {bucket: torch.tensor(rows) for bucket, rows in by_len.items()}


def packed_sdpa_attention_forward(module, query_BHSD, key_BKSD, value_BKSD, attention_mask, dropout=0.0,
                                  scaling=None, position_ids=None, **kwargs):
    """transformers' attention-function signature; returns ((B, S, Hq, D) output, None).

    Documents of similar length are batched: for each length bucket L the (n, L) index gathers its n
    documents, right-padded, into (n, H, L, D); one causal SDPA call serves them all (a real query never
    sees the padding after it); the real positions' outputs are put back in row order.
    """
    B, Hq, S, D = query_BHSD.shape
    per_document = ((PER_DOCUMENT_ALWAYS[0] or (module.training and splits_documents_on(query_BHSD.device)))
                    and position_ids is not None and S == key_BKSD.shape[2] > 1)
    spans = document_spans(position_ids) if per_document else None
    if spans is None or all(len(row) == 1 for row in spans):
        return sdpa_attention_forward(module, query_BHSD, key_BKSD, value_BKSD, attention_mask, dropout=dropout,
                                      scaling=scaling, position_ids=position_ids, **kwargs)
    q_THD, k_TKD, v_TKD = (x.transpose(1, 2).reshape(B * S, x.shape[1], D) for x in (query_BHSD, key_BKSD, value_BKSD))
    outs, where = [], []
    for bucket, index_NL in length_buckets(spans, S).items():
        index_NL = index_NL.to(query_BHSD.device)
        n = index_NL.shape[0]
        # index_select, not x[index]: its backward is an index_add, several times faster on CPU than the
        # accumulating index_put of advanced indexing
        q, k, v = (x.index_select(0, index_NL.flatten()).view(n, bucket, x.shape[1], D).transpose(1, 2)
                   for x in (q_THD, k_TKD, v_TKD))  # (n, H, L, D)
        o_NLHD = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                                enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)
        real_NL = torch.ones_like(index_NL, dtype=torch.bool)
        real_NL[:, 1:] = index_NL[:, 1:] != index_NL[:, :-1]  # the padding repeats the last index
        keep = torch.nonzero(real_NL.flatten()).flatten()
        outs.append(o_NLHD.reshape(n * bucket, Hq, D).index_select(0, keep))
        where.append(index_NL.flatten()[keep])
    order_T = torch.argsort(torch.cat(where))
    return torch.cat(outs).index_select(0, order_T).view(B, S, Hq, D), None


AttentionInterface.register(NAME, packed_sdpa_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
