"""DeepSpeed wiring: the only place that knows DeepSpeed's JSON and its engine set-up.

`deepspeed_config` turns the stage config into the plain dict DeepSpeed wants: batch sizes
(DeepSpeed does not resolve HF's "auto"), precision, gradient clipping, and AutoEP expert
parallelism (`"expert_parallel": {"enabled", "autoep_size", "preset_model": "mixtral"}`).

Which combinations run (checked in `train.config.validate` and here):
  * expert_parallel_size must divide num_local_experts (equal experts per rank) and the
    world size (EP groups tile the ranks; the remaining factor is expert-data-parallel).
  * AutoEP works with ZeRO 0-3 (DeepSpeed ≥ 0.19); ZeRO-3 partitions the expert weights
    inside each expert-data-parallel group.
  * Without EP under ZeRO-3 the Mixtral MoE block is made a ZeRO-3 *leaf module*: its
    parameters are gathered once at block entry, so ranks whose tokens pick different experts
    never wait on each other's parameter fetches (the classic MoE hang, DeepSpeed#4808).
"""

from __future__ import annotations

import contextlib

from omegaconf import OmegaConf

import torch


def collective_device() -> torch.device:
    """Where a tensor must be for a collective: NCCL, the GPU backend, takes CUDA tensors only; gloo the host's."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_here(t: torch.Tensor, op=None) -> torch.Tensor:
    """All-reduce a small host-side tensor (counts, flags, tables) through `collective_device()` and return it
    where it was: under NCCL a host tensor could not be reduced at all (every GPU run's first step)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return t
    moved = t.to(collective_device())
    dist.all_reduce(moved, op=op if op is not None else dist.ReduceOp.SUM)
    return moved.to(t.device)


def accumulation_steps(cfg, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank: global batch / (micro-batch × data-parallel groups),
    a data-parallel group being `sequence_parallel_size` ranks that share their rows."""
    return cfg.global_batch_size // (cfg.micro_batch_size * (world_size // cfg.get("sequence_parallel_size", 1)))


def deepspeed_config(cfg, world_size: int, dtype: torch.dtype, model_config=None) -> dict:
    """Plain DeepSpeed config dict for this launch. Prints nothing; see `batch_arithmetic`.
    `model_config` (the MixtralConfig actually trained, e.g. `model_path`'s) sizes the ZeRO-3 buffers;
    None: the preset `cfg.model`."""
    ds = OmegaConf.to_container(cfg.deepspeed, resolve=True, enum_to_str=True) if cfg.deepspeed else {}
    sp = cfg.get("sequence_parallel_size", 1)
    gas = accumulation_steps(cfg, world_size)
    if sp > 1:  # DeepSpeed's batch check then counts data-parallel groups, not ranks
        ds["sequence_parallel_size"] = sp
        if ds.get("zero_optimization", {}).get("stage") == 3:  # one averaging path: model/sequence_parallel.py
            ds["zero_optimization"]["reduce_scatter"] = True
    ds["train_batch_size"] = cfg.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    ds["gradient_accumulation_steps"] = gas
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds["bf16"] = {"enabled": dtype == torch.bfloat16}
    ds["fp16"] = {"enabled": dtype == torch.float16}
    if cfg.expert_parallel_size > 1:
        ds["expert_parallel"] = {"enabled": True, "autoep_size": cfg.expert_parallel_size, "preset_model": "mixtral"}
        if cfg.get("lora") is not None and cfg.lora.enabled:  # peft's wrapper puts the layers under base_model.model.
            ds["expert_parallel"]["moe_layer_pattern"] = r"(?:base_model\.model\.)?model\.layers\.\d+\.mlp"
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") in (1, 2):
        # DeepSpeed's default buckets hold 5e8 elements: a ZeRO-2 rank gathered every gradient of a 439M-parameter
        # model (1.6 GB fp32) in its reduce bucket before reducing any (bench/load_memory.py). Scaled to the model.
        h = (model_config if model_config is not None else cfg.model).hidden_size
        zero.setdefault("reduce_bucket_size", h * h)
        zero.setdefault("allgather_bucket_size", h * h)
    if zero.get("stage") == 3:
        # Sizes scaled to the model unless the config sets them. DeepSpeed's defaults are absolute: 5e8-element
        # buckets allocate 2 GB fp32 on every rank, and up to 1e9 gathered parameters stay resident
        # (`stage3_max_live_parameters` / `_max_reuse_distance`), which is the whole of a model below 1e9
        # parameters. Here at most two decoder layers stay gathered, one under EP (bench/load_memory.py measures it).
        from model.build import mixtral_config
        from model.memory import parameter_counts

        m = model_config if model_config is not None else mixtral_config(OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True))
        h = m.hidden_size
        layer = parameter_counts(m)["layer_experts"] + parameter_counts(m)["layer_dense"]
        zero.setdefault("reduce_bucket_size", h * h)
        zero.setdefault("stage3_prefetch_bucket_size", int(0.9 * h * h))
        zero.setdefault("stage3_param_persistence_threshold", 10 * h)
        # under EP a rank's share of a layer is smaller, and one layer live is enough
        live = layer if cfg.expert_parallel_size > 1 else 2 * layer
        zero.setdefault("stage3_max_live_parameters", live)
        zero.setdefault("stage3_max_reuse_distance", live)
    ds.setdefault("steps_per_print", 10**9)
    return ds


@contextlib.contextmanager
def fp32_master_shared():
    """Around `deepspeed.initialize`: under ZeRO-3, an fp32 model's own partitions serve as the optimizer's
    fp32 master weights instead of a second copy (1/N of the model's bytes less per rank).

    DeepSpeed means to do this (stage3.py `_create_fp32_partitions`: "we don't need another copy of the
    weights") when a partition's dtype and device already are the master's, but compares `tensor.device`
    (a torch.device) with `self.device` (the str "cpu" or "cuda:0"), which is never equal; during that call
    `self.device` is made a torch.device. bf16/fp16 models (dtypes differ) are unaffected.
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    original = Stage3._create_fp32_partitions

    def create(self):
        device = self.device
        self.device = torch.device(device) if isinstance(device, str) else device
        try:
            return original(self)
        finally:
            self.device = device

    Stage3._create_fp32_partitions = create
    try:
        yield
    finally:
        Stage3._create_fp32_partitions = original


@contextlib.contextmanager
def frozen_experts_dense():
    """Around `deepspeed.initialize`: ZeRO-1 under expert parallelism with every expert weight frozen (LoRA
    on attention) trains like a dense model. DeepSpeed's ZeRO-1/2 optimizer asserts that a model with MoE layers
    has an optimizer group marked "moe", and its engine drops empty groups first, so a LoRA run had no way to
    start; the frozen experts have no gradients to reduce over their expert-data-parallel group, and every
    trainable parameter is reduced over the whole data-parallel group, as without MoE layers."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Zero12

    original = Zero12._configure_moe_settings

    def configure(self):
        if any(self.is_moe_group(group) for group in self.optimizer.param_groups):
            return original(self)
        self.has_moe_layers = False

    Zero12._configure_moe_settings = configure
    try:
        yield
    finally:
        Zero12._configure_moe_settings = original


@contextlib.contextmanager
def quantized_expert_parallel():
    """Around `deepspeed.initialize` for QLoRA under expert parallelism (model.quantize=nf4, EP > 1): each AutoEP
    layer computes with this rank's 4-bit expert block. The loader kept that block in NF4 and left meta tensors
    of the full shape in the HF experts' place (model/quantize.py `store_expert_block`); AutoEP's
    `GroupedExperts` is built on the meta device and copies meta slices of them (no memory), and is replaced by
    `QuantizedGroupedExperts` over the block as each layer is built. Nothing in 16 bits is allocated for the
    experts."""
    import deepspeed.module_inject.auto_ep_layer as autoep_layer
    from deepspeed.module_inject.auto_ep import AutoEP

    from model.quantize import QuantizedGroupedExperts, take_expert_blocks

    original, grouped_experts = AutoEP._replace_moe_layer_without_retarget, autoep_layer.GroupedExperts

    def meta_grouped_experts(*args, **kwargs):  # replaced at once: its weights are never allocated
        with torch.device("meta"):
            return grouped_experts(*args, **kwargs)

    def replace(self, spec, ep_size, ep_rank, collect_sources=False):
        blocks = take_expert_blocks(self.model.get_submodule(spec.moe_module_name).experts)
        replacement, sources = original(self, spec, ep_size, ep_rank, collect_sources)
        if blocks is not None:
            first = blocks["gate_up_proj"].first
            if first != replacement.ep_rank * replacement.num_local_experts:
                raise RuntimeError(f"{spec.moe_module_name}: AutoEP placed expert block {replacement.ep_rank} on this "
                                   f"rank, but experts from {first} were loaded")
            replacement.experts = QuantizedGroupedExperts(blocks["gate_up_proj"], blocks["down_proj"])
        return replacement, sources

    AutoEP._replace_moe_layer_without_retarget, autoep_layer.GroupedExperts = replace, meta_grouped_experts
    try:
        yield
    finally:
        AutoEP._replace_moe_layer_without_retarget, autoep_layer.GroupedExperts = original, grouped_experts


def settle_quantized_expert_parallel(engine) -> None:
    """After `deepspeed.initialize` under `quantized_expert_parallel`: the engine treats the model as dense. Its
    AutoEP layers hold no expert parameters (4-bit buffers, not in the state dict, read again from model_path on
    resume), so DeepSpeed's per-expert checkpoint files have nothing to save (they expect `w1/w2/w3`), and every
    trainable parameter (adapters, routers) is replicated and reduced over the whole data-parallel group."""
    engine.has_moe_layers = False


def settle_zero0(engine) -> None:
    """Right after `deepspeed.initialize`, two ZeRO-0 engines made as the stages expect them (no-op otherwise).

    * bf16/fp16: DeepSpeed wraps the client optimizer in `FP16_UnfusedOptimizer` (fp32 master copies), whose
      `initialize_optimizer_states` takes one AdamW step on zero gradients to create the states: Adam's step
      count starts one ahead (the first real update is 0.735× its size with betas (0.9, 0.95)) and weight
      decay is applied once to the masters. The states are dropped (AdamW makes them again at the first real
      step) and the masters copied again from the untouched 16-bit weights.
    * fp32: the engine clips through `clip_fp32_gradients`, which discards the norm it computes, so
      `get_global_grad_norm()` answered None. The norm is kept (and computed when clipping is off, too).
    """
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.utils import clip_grad_norm_

    if engine.zero_optimization_stage() != 0:
        return
    if isinstance(engine.optimizer, FP16_UnfusedOptimizer):
        engine.optimizer.optimizer.state.clear()
        engine.optimizer.refresh_fp32_params()
    elif not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        def clip_and_keep_norm():
            max_norm = engine.gradient_clipping() if engine.gradient_clipping() > 0 else float("inf")
            engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=max_norm,
                                                       mpu=engine.mpu)

        engine.clip_fp32_gradients = clip_and_keep_norm
        if engine.gradient_clipping() == 0:  # the engine calls it only when clipping: measure the norm anyway
            step = engine._take_model_step

            def take_model_step(lr_kwargs):
                clip_and_keep_norm()
                return step(lr_kwargs)

            engine._take_model_step = take_model_step


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def batch_arithmetic(cfg, world_size: int) -> str:
    """Human-readable batch arithmetic, e.g. for the start-of-run banner."""
    sp = cfg.get("sequence_parallel_size", 1)
    gas = accumulation_steps(cfg, world_size)
    world_size //= sp
    if sp > 1:
        return (f"micro {cfg.micro_batch_size} × accumulation {gas} × {world_size} data-parallel groups of {sp} "
                f"sequence-parallel ranks = {cfg.global_batch_size} {'pairs' if cfg.stage == 'dpo' else 'sequences'} "
                f"of ≤{cfg.max_seq_len} tokens, {-(-cfg.max_seq_len // sp)} per rank")
    if cfg.stage == "dpo":  # a micro-batch's pairs packed into one row, both answers of each
        return (f"micro {cfg.micro_batch_size} × accumulation {gas} × {world_size} data-parallel ranks = "
                f"{cfg.global_batch_size} preference pairs of ≤{cfg.max_seq_len} tokens per side")
    return (f"micro {cfg.micro_batch_size} × accumulation {gas} × {world_size} data-parallel ranks = "
            f"{cfg.global_batch_size} sequences of ≤{cfg.max_seq_len} tokens = "
            f"{cfg.global_batch_size * cfg.max_seq_len / 1000:.1f}k token slots/step")


def mark_moe_leaf_modules(model) -> int:
    """Make every Mixtral MoE block a ZeRO-3 leaf module; returns how many were marked."""
    from deepspeed.utils import set_z3_leaf_modules
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    return len(set_z3_leaf_modules(model, [MixtralSparseMoeBlock]))


def deepspeed_checkpoint_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19's ZeRO 0-3 / MoE checkpoints pickle (found by loading
    every file of each kind of checkpoint with weights_only=True; tests/distributed resume them all)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
