"""Sequence parallelism: the N ranks of a group share each row's tokens (DeepSpeed Ulysses, ALST).

    sequence_parallel_size=N   (train/config.py; world size = N × data-parallel groups)

Every rank of a group trains the same rows, holding positions [r·S/N, (r+1)·S/N) of each (`shard`).
Everything outside attention is per token, so it runs on the shard alone: embeddings, RoPE (from the
row's own position ids), the MoE blocks, the fused LM-head loss (model/losses.py) — no rank ever holds
a whole row's activations or logits. Attention is DeepSpeed's `UlyssesSPAttentionHF`: an all-to-all
turns (B, H, S/N, D) shards into (B, H/N, S, D) head groups, the model's own attention function runs
on whole rows for H/N heads (packed documents kept apart by the gathered position ids, as without SP:
model/attention.py), and a second all-to-all returns the shards. DeepSpeed's engine, given the
groups (`setup` returns them, with its `mpu`), reduces gradients over all ranks and divides by the number of
data-parallel groups, so each rank's loss must be its *share* of its group's loss:

    cross-entropy      Σ over the shard's targets / (targets in the global batch)       (as for DP)
    router losses      f_e and P_e over the whole row (`group_sum`): the same value on every rank,
                       each rank's gradient through its own tokens only
    DPO log-probs      Σ over the row's answer tokens (`group_sum`), likewise

Labels are shifted *before* the cut (targets[i] = labels[i+1], what position i predicts), so the last
position of a shard predicts the first token of the next one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from model.losses import IGNORE_INDEX


@dataclass(frozen=True)
class SequenceParallel:
    """A run's sequence-parallel groups, made once by `setup` and held by the run (train/runtime.py `Run`)."""
    group: Any   # this rank's sequence-parallel process group
    mpu: Any     # DeepSpeed's groups object, for every engine of the run (the DPO reference's too)
    rows: int    # rows per forward that DeepSpeed's attention was set up for (it checks the shape)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)


def setup(model, size: int, rows: int) -> SequenceParallel | None:
    """Make the model's attention sequence-parallel over groups of `size` consecutive ranks, for micro-batches
    of `rows` rows (DeepSpeed's attention checks the shape); None when size is 1. DeepSpeed keeps its groups
    in its own module state, so this runs once per process. The gathered rows reach the model's attention
    function without a mask: packed documents are kept apart by their position ids (model/attention.py)."""
    if size == 1:
        return None
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    config = model.config
    head_dim = getattr(config, "head_dim", None)
    # DeepSpeed reads getattr(config, "head_dim", hidden / heads); Mixtral's config has the key, set to None
    config.head_dim = head_dim or config.hidden_size // config.num_attention_heads
    try:
        mpu = UlyssesSPAttentionHF.register_with_transformers(
            model, core_attn_implementation=config._attn_implementation, sequence_parallel_size=size,
            micro_batch_size=rows, seq_length_is_variable=True)
    finally:
        config.head_dim = head_dim
    return SequenceParallel(mpu.get_sequence_parallel_group(), mpu, rows)


def gradient_factor(zero_stage: int, size: int) -> int:
    """What a rank's loss is multiplied by before backward so that its gradient arrives whole.

    DeepSpeed divides the reduced gradients by the number of data-parallel groups (world / N) at ZeRO
    0-2 and in ZeRO-3's all-reduce path, but ZeRO-3's default reduce-scatter path
    (`reduce_scatter_coalesced`, deepspeed 0.19.8) divides by the whole world: 1/N too small. Measured
    (tests/distributed/test_sequence_parallel.py): without this factor a ZeRO-3 SP=2 step has half the
    1-rank gradient norm; with it, the same norm and losses. `deepspeed_config` keeps ZeRO-3 on that path."""
    return size if zero_stage == 3 else 1


def group_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Σ of `x` over the ranks of `group` (a sequence-parallel group; identity for None).
    The value is the group's sum, the gradient flows to this rank's `x` only: summed over the group by
    DeepSpeed's gradient reduction, it is the gradient of the sum."""
    if group is None:
        return x
    total = x.detach().clone()
    dist.all_reduce(total, group=group)
    return x + (total - x.detach())


def shift(labels_BS: torch.Tensor) -> torch.Tensor:
    """targets[:, i] = labels[:, i+1] (the token position i predicts); the last position has none."""
    out = torch.full_like(labels_BS, IGNORE_INDEX)
    out[:, :-1] = labels_BS[:, 1:]
    return out


def shard(batch: dict, rank: int, size: int, pad_id: int) -> dict:
    """This rank's 1/size of every row of a micro-batch `(B, S)`, with `targets` (shifted labels) in place
    of `labels` (and `target_segment`, `target_pair` in place of DPO's `segment`, `pair`). Rows are right-padded
    to a multiple of `size`: padding is input `pad_id`, no target, masked out of the router losses, positions
    continuing the row's last (so it never joins a document that comes before it). Entries that are not
    `(B, S)` tensors (DPO's count of `pairs`) are kept as they are."""
    out = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if "labels" in out:
        out["targets"] = shift(out.pop("labels"))
    for k in ("segment", "pair"):
        if k in out:
            out[f"target_{k}"] = shift(out.pop(k))
    S = out["input_ids"].shape[1]
    pad = -S % size
    if pad:
        last = out["position_ids"][:, -1:]
        fill = {"input_ids": pad_id, "targets": IGNORE_INDEX, "target_segment": 0, "target_pair": 0, "real_mask": False,
                "router_mask": False}
        for k, v in out.items():
            if k == "position_ids":
                out[k] = torch.cat([v, last + torch.arange(1, pad + 1, dtype=v.dtype)], 1)
            else:
                out[k] = torch.cat([v, torch.full((v.shape[0], pad), fill[k], dtype=v.dtype)], 1)
    n = (S + pad) // size
    rest = {k: v for k, v in batch.items() if not isinstance(v, torch.Tensor)}
    return {k: v[:, rank * n:(rank + 1) * n].contiguous() for k, v in out.items()} | rest


def whole_row_logits(model, input_ids_BS: torch.Tensor, sp: SequenceParallel, recorder=None):
    """`(B, S, V)` logits of unpacked rows (positions 0..S-1) under a model made sequence-parallel by `sp`: every
    rank of the group passes the same rows, runs its shard, and gets the whole rows' logits back. The rows go
    through in forwards of the size the attention was set up for (`sp.rows`), the last one filled up with copies.
    With a `RouterLogitsRecorder` (hooked on `model`), also each layer's router logits of the whole rows,
    `(B·S, E)` in row order: returns (logits, router logits per layer or None)."""
    size, rows = sp.size, sp.rows
    B, S = input_ids_BS.shape
    logits_out, routers = [], []

    def whole(x_RnX: torch.Tensor) -> torch.Tensor:  # this rank's shard of each row → the group's whole rows
        parts = [torch.empty_like(x_RnX) for _ in range(size)]
        dist.all_gather(parts, x_RnX.contiguous(), group=sp.group)
        return torch.cat(parts, 1)[:, :S]

    for at in range(0, B, rows):
        ids = input_ids_BS[at:at + rows]
        ids = torch.cat([ids, ids[-1:].expand(rows - len(ids), S)]) if len(ids) < rows else ids
        position_ids = torch.arange(S, device=ids.device).expand_as(ids)
        b = shard({"input_ids": ids, "position_ids": position_ids}, sp.rank, size, pad_id=0)
        with recorder if recorder is not None else contextlib.nullcontext():
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        logits_out.append(whole(logits))
        if recorder is not None:  # each layer's (rows · S/size, E) → (rows, S, E)
            routers.append([whole(r.reshape(rows, -1, r.shape[-1])) for r in recorder.logits])
    routing = None if recorder is None else [torch.cat([f[layer] for f in routers])[:B].flatten(0, 1)
                                             for layer in range(len(routers[0]))]
    return torch.cat(logits_out)[:B], routing
