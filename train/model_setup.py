"""The model and its DeepSpeed engine: built for this rank's share of the layout (model/load.py), with the
LM head that returns the loss (model/head.py), our AdamW and LR schedule, sequence parallelism wired in."""

from __future__ import annotations

import contextlib
import math
import os

import torch
from omegaconf import OmegaConf

from model import sequence_parallel
from model.build import build_model, model_folder
from model.distributed import (deepspeed_config, fp32_master_shared, frozen_experts_dense, mark_moe_leaf_modules,
                               quantized_expert_parallel, settle_quantized_expert_parallel, settle_zero0, zero_stage)
from model.head import install_lm_head
from model.load import check_expert_placement, placement
from model.router import fp32_router_logits
from train import faults
from train.checkpoints import prepare_elastic_resume
from train.memory_log import set_mmap_threshold
from train.runtime import Run


def stage_tokenizer(cfg, run: Run | None = None):
    """The run's tokenizer: model_path's own tokenizer.model, else `model.tokenizer`, else v1
    (data/tokenizer.py); its version goes to the log and `config.yaml` (`tokenizer_used`). For a hub name only
    tokenizer.model and config.json are fetched here (data/hub.py: from the cache when the Hub cannot be reached)."""
    from pathlib import Path

    from data.hub import HubUnreachable, model_file
    from data.tokenizer import TOKENIZER_FILE, load_tokenizer
    from model.build import model_config
    from train.config import ConfigError

    folder = None
    if cfg.model_path and Path(cfg.model_path).expanduser().is_dir():
        folder = Path(cfg.model_path).expanduser()
    elif cfg.model_path:
        try:
            folder = model_file(cfg.model_path, TOKENIZER_FILE).parent
        except HubUnreachable:
            raise
        except Exception:  # noqa: BLE001 - the repository has no tokenizer.model: model.tokenizer, else v1
            folder = None
    tokenizer = load_tokenizer(folder, cfg.model.tokenizer)
    vocab = model_config(cfg.model, cfg.model_path).vocab_size
    if tokenizer.vocab_size > vocab:  # ids past the embedding: one line naming the key, before any weights load
        raise ConfigError(f"model.vocab_size={vocab} but the {tokenizer.version} tokenizer ({tokenizer.path.name}) "
                          f"has {tokenizer.vocab_size} pieces: use a preset with vocab_size ≥ {tokenizer.vocab_size} "
                          f"(mixtral_8x22b and tiny_v3 have 32768)")
    if run is not None and run.main:
        run.print(f"[{cfg.stage}] tokenizer: {tokenizer.version}, {tokenizer.vocab_size} pieces ({tokenizer.path})")
        with open(run.out / "config.yaml", "a") as f:  # what the run used, beside what it was asked
            f.write(f"tokenizer_used:\n  version: {tokenizer.version}\n  vocab_size: {tokenizer.vocab_size}\n"
                    f"  file: {tokenizer.path}\n")
    return tokenizer


def lr_lambda(cfg):
    """The learning-rate factor f(k) of optimizer update k = 0 … T−1 (T = max_steps, W = optim.warmup_steps,
    m = optim.min_lr_ratio); update k is applied at lr · f(k), which metrics.jsonl logs as step k + 1:

        warmup      k < W:  (k + 1) / W                       (the first update is not at rate 0)
        constant    1
        linear      m + (1 − m) · (1 − p)                     p = clamp((k − W) / (T − W), 0, 1)
        cosine      m + (1 − m) · ½ (1 + cos(π p))
        wsd         m + (1 − m) · clamp((T − 1 − k) / D, 0, 1)   D = max(1, round(decay_fraction · (T − W))):
                    constant, then linear over the last D updates, reaching m exactly at the last one

    Every factor lies in [min(m, 1/W), 1] for every k ≥ 0, past T included (a resumed run with a lower
    max_steps), so no rate is ever negative. tests/unit/test_schedules.py checks each schedule at every step."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr_ratio

    def clamp(x: float) -> float:
        return min(1.0, max(0.0, x))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.optim.schedule == "constant":
            return 1.0
        if cfg.optim.schedule == "wsd":
            decay = max(1, round(cfg.optim.decay_fraction * (total - warmup)))
            return floor + (1 - floor) * clamp((total - 1 - step) / decay)
        progress = clamp((step - warmup) / max(1, total - warmup))
        if cfg.optim.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_engine(cfg, model, run: Run):
    """DeepSpeed engine with our AdamW and LR schedule (DeepSpeed steps both at accumulation boundaries)."""
    import deepspeed

    ds = deepspeed_config(cfg, run.world, run.dtype, run.model_config)
    prepare_elastic_resume(cfg, run, ds)
    if zero_stage(ds) == 3 and cfg.expert_parallel_size == 1:
        mark_moe_leaf_modules(model)
    made = []

    def make_optimizer(_params):
        # Called by DeepSpeed after AutoEP has swapped in its expert modules, so the groups hold the
        # live parameters; ZeRO-1/2 with EP also need the expert weights in their own "moe" groups.
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [g for g in ({"name": "decay", "params": [p for p in params if p.ndim >= 2],
                               "weight_decay": cfg.optim.weight_decay},
                              {"name": "no_decay", "params": [p for p in params if p.ndim < 2], "weight_decay": 0.0})
                  if g["params"]]
        if cfg.expert_parallel_size > 1 and zero_stage(ds) in (1, 2):
            from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

            groups = split_params_into_different_moe_groups_for_optimizer(groups)
        if cfg.optim.name == "sgd":
            made.append(faults.guarded(torch.optim.SGD)(groups, lr=cfg.optim.lr))
        else:
            # torch's fused AdamW kernel (CPU and CUDA): one pass over each tensor instead of ~10 element-wise
            # ops; 6x faster per step on CPU (BENCHMARKS.md).
            fused = all(p.device.type in ("cpu", "cuda") for p in params)
            made.append(faults.guarded(torch.optim.AdamW)(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                                          eps=cfg.optim.eps, fused=fused))
        return made[-1]

    rows = 1 if cfg.stage == "dpo" else cfg.micro_batch_size  # a DPO micro-batch is one row (data/preference.py)
    run.seq_parallel = sequence_parallel.setup(model, run.sp, rows)
    quantized_ep = cfg.model.quantize != "none" and cfg.expert_parallel_size > 1  # QLoRA's experts, split over ranks
    with fp32_master_shared(), frozen_experts_dense(), \
            quantized_expert_parallel() if quantized_ep else contextlib.nullcontext():
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer, config=ds, mpu=run.seq_parallel and run.seq_parallel.mpu,
                                               lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    settle_zero0(engine)
    if quantized_ep:
        settle_quantized_expert_parallel(engine)
    fp32_router_logits(engine.module)  # AutoEP built new routers inside initialize
    check_expert_placement(engine.module, placement(ds, run.rank))
    set_mmap_threshold(cfg.malloc_mmap_threshold or (4 if zero_stage(ds) == 3 else 32) * 2**20)  # training: see memory_log
    run.memory.end("engine")
    if run.world == 1 and zero_stage(ds) == 0 and run.dtype == torch.float32:
        # One process, plain fp32 ZeRO-0: DeepSpeed's gradient "all-reduce" would flatten every gradient into a
        # bucket, reduce it over one rank and copy it back (~3% of a CPU step, BENCHMARKS.md).
        engine.enable_backward_allreduce = False
    return engine, faults.NonFinite(made[-1], cfg.max_bad_steps)


def load_model(cfg, run: Run, ds: dict | None = None, phase: str = "load"):
    """The stage's HF Mixtral, built for this rank's share of the layout (ZeRO-3 partitions, or dense +
    this rank's experts under expert parallelism; `ds` is the engine's DeepSpeed config, default the
    stage's), with an `LMHead` as its LM head (model/head.py: logits, or the loss given targets). A hub
    `model_path` is downloaded by one rank per node first. Peak memory from here to the end is recorded as `phase`."""
    # loading and engine set-up free many MB-sized tensors: give them back to the OS
    set_mmap_threshold(cfg.malloc_mmap_threshold or 2**20)
    run.memory.begin()
    if cfg.model_path is not None and not os.path.isdir(os.path.expanduser(cfg.model_path)):
        if run.local_rank == 0:
            model_folder(cfg.model_path)
        run.barrier()
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True), model_path=cfg.model_path,
                        dtype=run.dtype, seed=cfg.seed,
                        placement=placement(ds or deepspeed_config(cfg, run.world, run.dtype, run.model_config), run.rank))
    install_lm_head(model)
    # the export's config.json states the router loss this run trained with, in HF's convention (model/router.py)
    model.config.router_aux_loss_coef = cfg.router.aux_loss_coef / model.config.num_experts_per_tok
    run.memory.end(phase)
    return model
