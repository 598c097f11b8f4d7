"""The DPO reference model, three ways (`dpo.reference`):

* precomputed (default): before training, one no-grad pass of the starting weights (which ARE the
  reference: DPO starts with policy == reference) over every training pair; the summed answer
  log-probs are cached at `<cache_dir>/ref-logps-<key>.pt`, keyed by the tokenized pairs, the
  tokenizer and the reference weights. No reference model sits in memory while training, and a
  rerun (or a resume) reads the cache.
* live: a second, frozen DeepSpeed engine (ZeRO-3 inference when the policy uses ZeRO-3) runs
  each micro-batch beside the policy.
* adapters_off (LoRA): the policy itself with its adapters disabled.

Every rank runs the same number of forwards (the last ones repeat pairs and are discarded), as
ZeRO-3 parameter gathering and expert-parallel all-to-all need all ranks in every forward.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch

from data.dataset import GlobalBatches, fingerprint, file_sha
from data.preference import answer_sums, collate
from model.distributed import all_reduce_here
from model.head import NO_LOGITS, final_hidden
from model.lora import adapters_off as without_adapters
from model.losses import token_logps
from model.router import fp32_router_logits
from model.sequence_parallel import group_sum


def answer_logps(model, b: dict, sp_group=None) -> tuple[torch.Tensor, ...]:
    """(chosen, rejected, n_chosen, n_rejected), each `(b["pairs"],)`, of a collated (and sequence-sharded) batch `b` of
    pairs under `model` (an engine, the policy or a reference): one forward that computes no logits, the
    answer tokens' log-probs from the LM head in chunks (`token_logps`), summed per answer and over the
    sequence-parallel group `sp_group` (the gradient flows through this rank's tokens)."""
    with final_hidden(model) as hidden:
        model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False, logits_to_keep=NO_LOGITS)
    logp_N = token_logps(hidden[0], model.get_output_embeddings(), b["targets"])
    return tuple(group_sum(x, sp_group) for x in answer_sums(logp_N, b["targets"], b["target_segment"], b["target_pair"], b["pairs"]))


def weights_fingerprint(cfg) -> dict:
    """Identity of the starting weights: the HF folder's weight files, or the preset and seed."""
    if cfg.model_path and os.path.isdir(cfg.model_path):
        files = sorted(Path(cfg.model_path).glob("*.safetensors"))
        return {"path": os.path.abspath(cfg.model_path),
                "files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]}
    if cfg.model_path:
        return {"hub": cfg.model_path}
    from omegaconf import OmegaConf

    return {"preset": OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True), "seed": cfg.seed}


@torch.no_grad()
def compute_logps(engine, pairs: list[dict], batches: GlobalBatches, micro: int, tokenizer, run, adapters_off: bool = False,
                  desc: str = "reference log-probs", mask_common_suffix: bool = False,
                  answers: tuple[str, ...] = ("chosen_ids", "rejected_ids"), share_prompt: bool = False) -> torch.Tensor:
    """`(n_pairs, 2)` float64 summed log-probs of (chosen, rejected) under `engine`'s current weights; with one
    of `answers` (a KTO row, data/preference.py `collate`), its log-probs in column 0 and zeros in column 1.

    The pass runs the training's own micro-batches (`batches`, from step 0 until every pair has been seen),
    so each pair's values come from the forward in which training first meets it, with the same
    batch-mates and padding: a bf16 forward's last bits depend on them (matrix kernels tile by row count,
    experts group the batch's tokens), so a pass in another order would make the reference differ from
    the policy at step 1. Each data-parallel group computes its share (a sequence-parallel group: each rank
    its share of their tokens); a pair's values are taken from its first occurrence only. The engine stays in
    training mode (no dropout in Mixtral): packed rows take per-document attention kernels there
    (model/attention.py), and the reference must take the same ones as the policy."""
    n = len(pairs)
    steps = math.ceil(n / batches.g)
    per_rank = batches.g // run.dp
    owner: dict[int, tuple[int, int]] = {}  # pair → (step, data-parallel rank) of its first occurrence
    for step in range(steps):
        for j, i in enumerate(batches.global_rows(step)):
            owner.setdefault(i, (step, j // per_rank))
    table = torch.zeros(n, 2, dtype=torch.float64)
    from train.console import progress

    for step in progress(range(steps), desc, enabled=run.main):
        for ix in batches.micro_batches(step, run.dp_rank, run.dp, micro):
            b = run.shard(collate([pairs[i] for i in ix], tokenizer.pad_id, mask_common_suffix, tokenizer, answers,
                                  share_prompt), tokenizer.pad_id)
            with without_adapters(engine.module) if adapters_off else contextlib.nullcontext():
                chosen, rejected, _, _ = answer_logps(engine, b, run.sp_group)
            for j, i in enumerate(ix):
                if owner[i] == (step, run.dp_rank) and run.rank % run.sp == 0:
                    table[i, 0], table[i, 1] = chosen[j].double().cpu(), rejected[j].double().cpu()
    return all_reduce_here(table)


def precomputed(engine, cfg, run, pairs: list[dict], tokenizer, adapters_off: bool = False,
                share_prompt: bool = False) -> torch.Tensor:
    """Cached reference log-probs for every pair, `(n, 2)` (chosen, rejected), computed on first use from the rows
    training runs (`share_prompt`: its layout, data/preference.py `collate`). KTO: for every example (completion,
    KL row's completion), each from the rows training runs (two passes)."""
    cache_dir = Path(cfg.data.cache_dir or run.out / "cache")
    key = fingerprint("ref-logps", file_sha(tokenizer.path), weights_fingerprint(cfg), cfg.precision, pairs,
                      "shared ending from a word boundary" if cfg.dpo.mask_common_suffix else False,
                      "one row per micro-batch" + (", prompt shared by the answers" if share_prompt else ""))
    path = cache_dir / f"ref-logps-{key}.pt"
    if path.is_file():
        run.print(f"[{cfg.stage}] reference log-probs: loaded from cache {path}")
        return torch.load(path, weights_only=True)
    if engine is None:
        raise RuntimeError(f"resuming a DPO run whose reference cache {path} is missing: the reference must come from "
                           "the starting weights; rerun from step 0 (resume=false) or restore the cache")
    t0 = time.time()
    batches = GlobalBatches(len(pairs), cfg.global_batch_size, cfg.seed)
    if cfg.dpo.loss_type == "kto":
        table = torch.stack([compute_logps(engine, pairs, batches, cfg.micro_batch_size, tokenizer, run, adapters_off,
                                           desc=f"reference log-probs ({rows})", answers=(key,))[:, 0]
                             for rows, key in (("completions", "completion_ids"), ("KL rows", "kl_ids"))], 1)
    else:
        table = compute_logps(engine, pairs, batches, cfg.micro_batch_size, tokenizer, run, adapters_off=adapters_off,
                              mask_common_suffix=cfg.dpo.mask_common_suffix, share_prompt=share_prompt)
    if run.main:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(table, tmp)
        os.replace(tmp, path)
        what = "examples" if cfg.dpo.loss_type == "kto" else "pairs"
        run.print(f"[{cfg.stage}] reference log-probs: computed for {len(pairs)} {what} in {time.time() - t0:.1f}s, "
                  f"cached at {path}")
    run.barrier()
    return table


def reference_ds_config(cfg, run) -> dict:
    """DeepSpeed config of the live reference: inference only, ZeRO-3 if the policy uses it, same EP."""
    from model.distributed import deepspeed_config, zero_stage

    ds = deepspeed_config(cfg, run.world, run.dtype, run.model_config)
    ref_ds = {k: ds[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                 "bf16", "fp16", "sequence_parallel_size") if k in ds}
    ref_ds["zero_optimization"] = {"stage": 3 if zero_stage(ds) == 3 else 0}
    if "expert_parallel" in ds:
        ref_ds["expert_parallel"] = ds["expert_parallel"]
    return ref_ds


def live_engine(run, model, ref_ds: dict):
    """A frozen DeepSpeed engine around `model` (built for `ref_ds`, `reference_ds_config`)."""
    import deepspeed

    for p in model.parameters():
        p.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ref_ds, mpu=run.seq_parallel and run.seq_parallel.mpu)
    fp32_router_logits(engine.module)  # AutoEP built new routers inside initialize
    return engine  # in training mode, as the policy: the same attention kernels (compute_logps)
