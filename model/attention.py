"""Attention for packed training rows on CPU: each document attends to itself only, computed per document.

Our packed rows hold many documents (data/dataset.py: positions restart at 0 for each). transformers'
`sdpa` turns that into a (B, 1, S, S) block-diagonal causal mask, and the CPU flash kernel then scores
every query against all S keys of its row and masks most of them away: for the embedded curriculum
(median document 14 tokens in 512-token rows) 88% of the scores are thrown away (E[L²] / (E[L]·S)). Here
each document attends over its own span only, in a causal SDPA call (`is_causal=True`, so the kernel also
skips the upper triangle), which gives the same result as the masked call (tests/unit/test_model.py).
Documents are batched by length (powers of two), so a row of 40 short documents costs a handful of
SDPA calls, not 40.

Used where it pays and is exact: training mode, on CPU, no KV cache (query length = key length),
`position_ids` given, and more than one document in the batch; everything else (generation, eval,
GPUs — where `flash_attention_2` does the same through `position_ids` — single documents) goes to
transformers' `sdpa` unchanged. Registered as `attn_implementation: packed_sdpa` (the default).

Shared prefixes: a document whose positions start at p > 0 reads the first p tokens of the nearest document
before it that starts at 0 as its context (`shared_prefixes`). The DPO stage lays out a pair as
[prompt chosen][last prompt token, rejected] (data/preference.py): the prompt is computed once, and the
rejected answer attends to it and to itself. Rows with such documents take the per-document kernels on every
device, in training (no mask that transformers derives from positions can express them).

Shapes: B rows, S positions, Hq query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "packed_sdpa"


def splits_documents_on(device: torch.device) -> bool:
    """Where training rows take the per-document kernels below: the CPU. Elsewhere (GPUs) they take transformers'
    `sdpa` with the block-diagonal mask it derives from the restarting `position_ids` (tests/unit/test_packing.py
    forces that path on the CPU and checks that documents stay apart)."""
    return device.type == "cpu"


def shares_prompts(model) -> bool:
    """Whether DPO rows for `model` may share each pair's prompt between its answers (data/preference.py
    `collate(share_prompt=True)`): under this module's attention, which reads shared prefixes from the positions;
    flash_attention_2, sdpa or eager would read each answer without its prompt."""
    return model.config._attn_implementation == NAME


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


def shared_prefixes(position_ids_BS: torch.Tensor, spans: list[list[tuple[int, int]]]) -> list[list[range]]:
    """Per document of `spans`, the row positions of the tokens it continues (an empty range for most): a span
    whose first position p is not 0 continues the first p tokens of the nearest span before it in its row that
    starts at position 0 (and is at least p long). That is the DPO layout's second answer of a pair, which reads
    its prompt from the first answer's segment (data/preference.py `collate`)."""
    first = position_ids_BS.cpu()
    out = []
    for b, row in enumerate(spans):
        base, row_out = None, []
        for s, e in row:
            p = int(first[b, s])
            if p == 0:
                base = (s, e)
            shared = p > 0 and base is not None and base[1] - base[0] >= p
            row_out.append(range(base[0], base[0] + p) if shared else range(0))
        out.append(row_out)
    return out


def length_buckets(spans: list[list[tuple[int, int]]], seq_len: int, prefixes: list[list[range]] | None = None,
                   min_len: int = 16) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Documents grouped by their length rounded up to a power of two L: {L: ((n, L) flat token indices
    b·S + position, (n, L) True where the output is the document's own)}, each document right-padded by
    repeating its last index. A document with a shared prefix (`shared_prefixes`) lists the prefix's tokens
    first, as queries whose outputs are dropped: one causal call gives its own tokens the prefix as context."""
    by_len: dict[int, tuple[list[list[int]], list[list[bool]]]] = {}
    for b, row in enumerate(spans):
        for d, (s, e) in enumerate(row):
            lead = list(prefixes[b][d]) if prefixes is not None else []
            idx = [b * seq_len + i for i in lead + list(range(s, e))]
            bucket = max(min_len, 1 << (len(idx) - 1).bit_length())
            keep = [False] * len(lead) + [True] * (e - s) + [False] * (bucket - len(idx))
            rows, keeps = by_len.setdefault(bucket, ([], []))
            rows.append(idx + [idx[-1]] * (bucket - len(idx)))
            keeps.append(keep)
    return {bucket: (torch.tensor(rows), torch.tensor(keeps)) for bucket, (rows, keeps) in by_len.items()}


def packed_sdpa_attention_forward(module, query_BHSD, key_BKSD, value_BKSD, attention_mask, dropout=0.0,
                                  scaling=None, position_ids=None, **kwargs):
    """transformers' attention-function signature; returns ((B, S, Hq, D) output, None).

    Documents of similar length are batched: for each length bucket L the (n, L) index gathers its n
    documents, right-padded, into (n, H, L, D); one causal SDPA call serves them all (a real query never
    sees the padding after it); the real positions' outputs are put back in row order.
    """
    B, Hq, S, D = query_BHSD.shape
    spans = prefixes = None
    # No mask for rows of several documents: the sequence-parallel attention gathered them and dropped the mask
    # transformers made for the shards (model/sequence_parallel.py), so the documents are known only by their
    # positions: kept apart here, on every device and outside training too.
    by_position = attention_mask is None
    if (by_position or module.training) and position_ids is not None and S == key_BKSD.shape[2] > 1:
        spans = document_spans(position_ids)
        prefixes = shared_prefixes(position_ids, spans)
    # shared prefixes (DPO's pairs) need these kernels on every device: a mask from the positions would hide them
    shared = prefixes is not None and any(len(r) for row in prefixes for r in row)
    if spans is None or all(len(row) == 1 for row in spans) or not (
            shared or by_position or splits_documents_on(query_BHSD.device)):
        return sdpa_attention_forward(module, query_BHSD, key_BKSD, value_BKSD, attention_mask, dropout=dropout,
                                      scaling=scaling, position_ids=position_ids, **kwargs)
    q_THD, k_TKD, v_TKD = (x.transpose(1, 2).reshape(B * S, x.shape[1], D) for x in (query_BHSD, key_BKSD, value_BKSD))
    outs, where = [], []
    for bucket, (index_NL, keep_NL) in length_buckets(spans, S, prefixes).items():
        index_NL = index_NL.to(query_BHSD.device)
        n = index_NL.shape[0]
        # index_select, not x[index]: its backward is an index_add, several times faster on CPU than the
        # accumulating index_put of advanced indexing
        q, k, v = (x.index_select(0, index_NL.flatten()).view(n, bucket, x.shape[1], D).transpose(1, 2)
                   for x in (q_THD, k_TKD, v_TKD))  # (n, H, L, D)
        o_NLHD = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                                enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)
        keep = torch.nonzero(keep_NL.flatten()).flatten().to(query_BHSD.device)
        outs.append(o_NLHD.reshape(n * bucket, Hq, D).index_select(0, keep))
        where.append(index_NL.flatten()[keep])
    order_T = torch.argsort(torch.cat(where))
    return torch.cat(outs).index_select(0, order_T).view(B, S, Hq, D), None


AttentionInterface.register(NAME, packed_sdpa_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
