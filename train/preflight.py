"""Refuse a layout that cannot work, before any weight is loaded.

`check(cfg, world, local_world, dtype)` reads the model's config.json (or the preset) and raises
`ConfigError` — one line naming the keys and the numbers — when:
  * expert_parallel_size does not divide the model's num_local_experts (from config.json, not the preset),
  * expert-parallel groups would straddle nodes unevenly: DeepSpeed forms them from consecutive ranks,
    so expert_parallel_size must divide the ranks per node, or be a multiple of it,
  * the weights, gradients and optimizer states one rank must hold (`model.memory.per_rank_bytes`,
    activations not even counted) exceed the memory one rank has: the GPU's memory, or on CPU the host's
    available memory shared by the node's ranks. `plan.enforce=false` turns this one off.
"""

from __future__ import annotations

import os

import torch

from model.memory import Layout, activation_bytes, alltoall_bytes, gib, parameter_counts, peak_bytes, per_rank_bytes
from train.config import ConfigError


def host_bytes_per_rank(local_world: int) -> float:
    """MemAvailable of this node divided by its ranks (inf where /proc/meminfo is absent)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / max(1, local_world)
    except OSError:
        pass
    return float("inf")


def layout_of(cfg, world: int, dtype: torch.dtype) -> Layout:
    zero = (cfg.deepspeed or {}).get("zero_optimization", {})
    return Layout(world=world, zero_stage=int(zero.get("stage", 0)), ep_size=cfg.expert_parallel_size,
                  dtype_bytes=torch.finfo(dtype).bits // 8, optimizer=cfg.optim.name, lora=cfg.lora.enabled,
                  offload_optimizer=bool(zero.get("offload_optimizer")), offload_params=bool(zero.get("offload_param")),
                  quantized=cfg.model.get("quantize", "none") == "nf4")


def tokens_per_micro_batch(cfg) -> int:
    """Tokens one rank runs forward at once (a DPO row holds the chosen and the rejected answer; with
    sequence parallelism a rank holds 1/sequence_parallel_size of each row)."""
    sp = cfg.get("sequence_parallel_size", 1)
    return cfg.micro_batch_size * -(-cfg.max_seq_len * (2 if cfg.stage == "dpo" else 1) // sp)


def model_config_of(cfg):
    """The MixtralConfig a stage trains: `model_path`'s config.json (only that file is read), or the preset."""
    from omegaconf import OmegaConf

    from model.build import model_config

    try:
        return model_config(OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True), cfg.model_path)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check(cfg, world: int, local_world: int, dtype: torch.dtype, config=None) -> str:
    """Raise `ConfigError` for a layout that cannot work; returns a one-line description of what a rank holds."""
    if config is None:
        config = model_config_of(cfg)
    ep, experts = cfg.expert_parallel_size, config.num_local_experts
    source = f"model_path={cfg.model_path}" if cfg.model_path else f"model={cfg.model.name}"
    if experts % ep:
        raise ConfigError(f"expert_parallel_size={ep} does not divide num_local_experts={experts} of {source}")
    if cfg.max_seq_len > config.max_position_embeddings:
        raise ConfigError(f"max_seq_len={cfg.max_seq_len} exceeds max_position_embeddings={config.max_position_embeddings} "
                          f"of {source}; to train longer rows set model.max_position_embeddings_override (and usually "
                          f"model.rope_theta_override)")
    if local_world > 0 and world > local_world and local_world % ep and ep % local_world:
        raise ConfigError(f"expert_parallel_size={ep} with {local_world} ranks per node: expert-parallel groups are "
                          f"consecutive ranks, so they must fit within a node (divide {local_world}) or span whole "
                          f"nodes (a multiple of {local_world})")
    layout = layout_of(cfg, world, dtype)
    need = dict(per_rank_bytes(config, layout, bool(cfg.model.gradient_checkpointing)))
    # the planner's per-rank figure (train/plan.py): the state above plus activations and AutoEP's buffers
    tokens = tokens_per_micro_batch(cfg)
    extra = (activation_bytes(config, tokens, layout.dtype_bytes, bool(cfg.model.gradient_checkpointing), cfg.stage == "dpo")
             + alltoall_bytes(config, tokens, layout.dtype_bytes, ep))
    need["total"] += peak_bytes(need, extra) - need["device"]
    need["device"] = peak_bytes(need, extra)
    total = parameter_counts(config)["total"]
    size = f"{total / 1e9:.2f}B" if total >= 1e9 else f"{total / 1e6:.1f}M"
    what = (f"{source}: {size} parameters; ZeRO-{layout.zero_stage}, expert_parallel_size={ep}, "
            f"{world} rank(s): one rank holds {gib(need['total'])} (weights {gib(need['weights'])}, gradients "
            f"{gib(need['gradients'])}, optimizer states and fp32 master {gib(need['optimizer'])}, "
            + (f"the step's flat gradient {gib(need['step'])}, " if need["step"] else "")
            + f"gathered {gib(need['gathered'])}, activations and all-to-all {gib(extra)})")
    if not cfg.plan.enforce:
        return what
    if torch.cuda.is_available():
        have, where = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, "GPU"
        host_need, host_have = need["host"], host_bytes_per_rank(local_world)
        if host_need > host_have:
            raise ConfigError(f"{what}, of which {gib(host_need)} offloaded to host memory, but a rank has "
                              f"{gib(host_have)} of host memory: use more nodes, or plan.enforce=false")
        device_need = need["device"]
    else:
        have, where = host_bytes_per_rank(local_world), "host memory (CPU run)"
        device_need = need["total"]
    if device_need > have:
        raise ConfigError(f"{what}, but a rank has {gib(have)} of {where}: use more ranks, deepspeed=zero3 with "
                          f"expert_parallel_size>1, deepspeed=zero3_offload, lora.enabled=true, or plan.enforce=false "
                          f"(python train/plan.py recipe=... lists the layouts that fit)")
    return what


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
