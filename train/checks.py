"""The checks Hydra cannot express: `validate(cfg, world_size)` applies the cross-key rules (expert and
sequence parallel sizes, batch arithmetic, combinations; the choice keys are typed in train/config.py) and
raises `ConfigError` naming the key before any heavy work; `check_output_dir` / `start_afresh` guard a run's
output folder. (train/preflight.py checks the layout against the model and the machine.)"""

from __future__ import annotations

import os

from model.losses import REFERENCE_FREE
from train.config import ConfigError
from train.contract import check_resume, earlier_work


def _positive(key: str, value) -> None:
    if value is None or value < 1:
        raise ConfigError(f"{key}={value!r}: must be a positive integer")


def looks_local(path: str) -> bool:
    """A path (not a hub name like 'mistralai/Mixtral-8x7B-v0.1')."""
    return path.startswith(("/", ".", "~")) or os.path.exists(path) or path.count("/") > 1


def validate(cfg, world_size: int | None = None) -> None:
    """Cross-key checks. `world_size` enables the ones that depend on the launch."""
    m = cfg.model
    _positive("max_steps", cfg.max_steps)
    _positive("global_batch_size", cfg.global_batch_size)
    _positive("micro_batch_size", cfg.micro_batch_size)
    _positive("max_seq_len", cfg.max_seq_len)
    _positive("expert_parallel_size", cfg.expert_parallel_size)
    _positive("sequence_parallel_size", cfg.sequence_parallel_size)
    _positive("model.num_experts_per_tok", m.num_experts_per_tok)
    if m.num_experts_per_tok > m.num_local_experts:
        raise ConfigError(f"model.num_experts_per_tok={m.num_experts_per_tok} exceeds "
                          f"model.num_local_experts={m.num_local_experts}")
    if m.num_local_experts % cfg.expert_parallel_size:
        raise ConfigError(f"expert_parallel_size={cfg.expert_parallel_size} does not divide "
                          f"model.num_local_experts={m.num_local_experts}: each rank must hold the same number of experts")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}")
    if m.num_attention_heads % m.num_key_value_heads:
        raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                          f"model.num_key_value_heads={m.num_key_value_heads}")
    positions = m.max_position_embeddings_override or m.max_position_embeddings
    if cfg.model_path is None and cfg.max_seq_len > positions:  # with model_path: its config.json's (train/preflight.py)
        raise ConfigError(f"max_seq_len={cfg.max_seq_len} exceeds model.max_position_embeddings={positions}")
    if cfg.malloc_mmap_threshold is not None:
        _positive("malloc_mmap_threshold", cfg.malloc_mmap_threshold)
    check_deepspeed_section(cfg.deepspeed or {})
    accumulate = ((cfg.deepspeed or {}).get("data_types") or {}).get("grad_accum_dtype")
    if accumulate in ("fp32", "float32") and (cfg.deepspeed.get("zero_optimization") or {}).get("stage") in (0, 1, None):
        # ZeRO-1 + bf16 + fp32 accumulation is DeepSpeed's BF16_Optimizer: with this project's loop its gradient
        # differs at step 1 (norm 2.44 against 2.91 on every other layout) and training drifts 5% in 4 steps;
        # DeepSpeed refuses it with ZeRO-0. ZeRO-2/3 accumulate in fp32 correctly (docs/scale.md, Precision).
        raise ConfigError(f"deepspeed.data_types.grad_accum_dtype={accumulate}: fp32 gradient accumulation is "
                          "supported with ZeRO-2 or ZeRO-3 (deepspeed=zero2|zero3); ZeRO-0/1 accumulate in the "
                          "model's dtype")
    if not 0.0 < cfg.optim.decay_fraction <= 1.0:
        raise ConfigError(f"optim.decay_fraction={cfg.optim.decay_fraction}: expected a share in (0, 1]")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas={list(cfg.optim.betas)}: expected two values")
    share = cfg.data.synthetic_passkey_share
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"data.synthetic_passkey_share={share}: expected a share between 0 and 1")
    if cfg.data.synthetic_passkey_filler < 0:
        raise ConfigError(f"data.synthetic_passkey_filler={cfg.data.synthetic_passkey_filler}: expected >= 0")
    if cfg.data.max_record_chars < 1:
        raise ConfigError(f"data.max_record_chars={cfg.data.max_record_chars}: must be >= 1")
    if cfg.router.aux_loss_coef < 0 or cfg.router.z_loss_coef < 0:
        raise ConfigError("router.aux_loss_coef and router.z_loss_coef must be >= 0")
    if cfg.checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every={cfg.checkpoint_every}: must be >= 0")
    if cfg.keep_checkpoints < 1:
        raise ConfigError(f"keep_checkpoints={cfg.keep_checkpoints}: must be >= 1 (the newest is needed to resume)")
    if cfg.dist_timeout_s < 5:
        raise ConfigError(f"dist_timeout_s={cfg.dist_timeout_s}: must be >= 5 seconds")
    if cfg.max_bad_steps < 1:
        raise ConfigError(f"max_bad_steps={cfg.max_bad_steps}: must be >= 1")
    if cfg.model_path is not None and looks_local(cfg.model_path):
        path = os.path.expanduser(cfg.model_path)
        if not os.path.isdir(path):
            raise ConfigError(f"model_path={cfg.model_path}: no such folder")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"model_path={cfg.model_path}: folder has no config.json (expected an HF model folder)")
    zero = cfg.deepspeed.get("zero_optimization", {}) if cfg.deepspeed else {}
    stage = int(zero.get("stage", 0))
    offload = bool(zero.get("offload_optimizer") or zero.get("offload_param"))
    if offload and stage == 0:
        raise ConfigError("deepspeed: CPU offload needs ZeRO stage >= 1 (zero_optimization.stage is 0)")
    if zero.get("offload_param") and stage != 3:
        raise ConfigError("deepspeed: zero_optimization.offload_param needs ZeRO stage 3")
    if cfg.model.quantize == "nf4":
        layouts = ("1 rank, data parallel under deepspeed=zero0/zero1/zero2 (the 4-bit base replicated), or "
                   "expert_parallel_size>1 under zero0/zero1")
        if not cfg.lora.enabled:
            raise ConfigError("model.quantize=nf4 needs lora.enabled=true: a 4-bit base is frozen (QLoRA trains adapters)")
        if stage == 3:
            raise ConfigError(f"model.quantize=nf4 with ZeRO-3: DeepSpeed cannot partition 4-bit weights; QLoRA runs on {layouts}")
        if cfg.expert_parallel_size > 1 and not cfg.model_path:
            raise ConfigError("model.quantize=nf4 with expert_parallel_size>1 needs model_path: each rank reads and "
                              "quantizes its own experts from the 16-bit folder, and the export reads them all from there")
    if cfg.lora.enabled and cfg.lora.experts and cfg.expert_parallel_size > 1:
        raise ConfigError("lora.experts=true with expert_parallel_size>1: DeepSpeed's expert-parallel MoE modules "
                          "replace the fused expert weights that peft's expert adapters wrap; use attention adapters "
                          "(lora.experts=false) with expert parallelism, or expert adapters with expert_parallel_size=1")
    if cfg.lora.enabled and cfg.expert_parallel_size > 1 and stage >= 2:
        raise ConfigError(f"lora.enabled=true with expert_parallel_size>1 under ZeRO-{stage}: DeepSpeed cannot checkpoint "
                          "frozen expert-parallel experts under ZeRO-3, and a ZeRO-2 resume does not continue exactly; "
                          "LoRA with expert parallelism runs under deepspeed=zero0 or zero1")
    if cfg.lora.enabled and cfg.lora.experts and stage == 3:
        raise ConfigError("lora.experts=true with ZeRO-3: expert adapters are merged by peft, which needs the full "
                          "expert weights in place; use deepspeed=zero2, or attention-only adapters (lora.experts=false)")
    if hasattr(cfg, "dpo"):
        free = cfg.dpo.loss_type in REFERENCE_FREE
        if free and cfg.dpo.dpop_lambda:
            raise ConfigError(f"dpo.dpop_lambda={cfg.dpo.dpop_lambda} with dpo.loss_type={cfg.dpo.loss_type}: DPOP compares "
                              "with a reference model, which this loss does not have")
        if cfg.dpo.loss_type == "kto":
            for key, value, why in (("sft_weight", cfg.dpo.sft_weight, "KTO's examples are unpaired: there is no chosen answer for "
                                     "an NLL term"), ("dpop_lambda", cfg.dpo.dpop_lambda, "DPOP is a pairwise margin"),
                                    ("label_smoothing", cfg.dpo.label_smoothing, "KTO's loss has no label smoothing"),
                                    ("mask_common_suffix", cfg.dpo.mask_common_suffix, "a shared ending needs a pair")):
                if value:
                    raise ConfigError(f"dpo.{key}={value} with dpo.loss_type=kto: {why}")
            if cfg.dpo.desirable_weight <= 0 or cfg.dpo.undesirable_weight <= 0:
                raise ConfigError(f"dpo.desirable_weight={cfg.dpo.desirable_weight}, dpo.undesirable_weight="
                                  f"{cfg.dpo.undesirable_weight}: both must be > 0")
        if cfg.dpo.loss_type == "orpo" and cfg.dpo.sft_weight:
            raise ConfigError(f"dpo.sft_weight={cfg.dpo.sft_weight} with dpo.loss_type=orpo: ORPO's loss holds the chosen "
                              "answer's NLL at weight 1 already; leave dpo.sft_weight at 0")
        if cfg.dpo.reference == "adapters_off" and not cfg.lora.enabled and not free:
            raise ConfigError("dpo.reference=adapters_off needs lora.enabled=true")
        if cfg.dpo.reference == "adapters_off" and cfg.lora.train_router and cfg.expert_parallel_size > 1 and not free:
            raise ConfigError("dpo.reference=adapters_off with lora.train_router=true and expert_parallel_size>1: "
                              "DeepSpeed's expert-parallel layer keeps one router, the trained one, so disabling the "
                              "adapters would not restore the reference's router; use lora.train_router=false, or "
                              "dpo.reference=precomputed")
        if cfg.dpo.beta <= 0:
            raise ConfigError(f"dpo.beta={cfg.dpo.beta}: must be > 0")
        if cfg.dpo.dpop_lambda < 0:
            raise ConfigError(f"dpo.dpop_lambda={cfg.dpo.dpop_lambda}: must be >= 0")
        if not cfg.model_path and not cfg.allow_random_init:
            raise ConfigError("model_path is required: DPO aligns a trained model (e.g. model_path=outputs/sft/hf, an SFT "
                              "export, or a hub name); allow_random_init=true runs it on a randomly initialised preset")
    if m.tiled_mlp_tokens < 0:
        raise ConfigError(f"model.tiled_mlp_tokens={m.tiled_mlp_tokens}: expected 0 (off) or a tile size in tokens")
    if m.tiled_mlp_tokens and cfg.expert_parallel_size > 1:
        raise ConfigError(f"model.tiled_mlp_tokens={m.tiled_mlp_tokens} with expert_parallel_size={cfg.expert_parallel_size}: "
                          "AutoEP replaces the MoE blocks with its own all-to-all layers, which do not tile")
    sp = cfg.sequence_parallel_size
    if sp > 1:
        if cfg.expert_parallel_size > 1:
            raise ConfigError(f"sequence_parallel_size={sp} with expert_parallel_size={cfg.expert_parallel_size}: "
                              "DeepSpeed's AutoEP does not combine with its sequence-parallel groups (ZeRO-3 refuses it; "
                              "at ZeRO-1/2 the expert gradients would be averaged over the wrong group); use one of the two")
        if m.num_attention_heads % sp or not (m.num_key_value_heads % sp == 0 or sp % m.num_key_value_heads == 0):
            raise ConfigError(f"sequence_parallel_size={sp}: the all-to-all splits attention heads across the group, so it "
                              f"must divide model.num_attention_heads={m.num_attention_heads} and divide or be a multiple "
                              f"of model.num_key_value_heads={m.num_key_value_heads}")
        if m.attn_implementation in ("sdpa", "eager", "flex_attention"):
            raise ConfigError(f"sequence_parallel_size={sp} with model.attn_implementation={m.attn_implementation}: "
                              "the sequence-parallel attention drops the packed-document mask and keeps documents apart "
                              "by position_ids only; use packed_sdpa (default) or flash_attention_2")
    if world_size is not None:
        if world_size % sp:
            raise ConfigError(f"sequence_parallel_size={sp} does not divide the world size {world_size} "
                              f"(torchrun --nproc_per_node x --nnodes)")
        world_size //= sp  # the batch arithmetic below is over data-parallel groups
        if world_size % cfg.expert_parallel_size:
            raise ConfigError(f"expert_parallel_size={cfg.expert_parallel_size} does not divide the world size "
                              f"{world_size} (torchrun --nproc_per_node x --nnodes)")
        per_step = cfg.micro_batch_size * world_size
        if cfg.global_batch_size % per_step:
            groups = "world size" if sp == 1 else f"data-parallel groups (world size / sequence_parallel_size {sp})"
            raise ConfigError(f"global_batch_size={cfg.global_batch_size} is not a multiple of micro_batch_size × "
                              f"{groups} = {cfg.micro_batch_size} × {world_size} = {per_step}")


RUN_FILES = ("metrics.jsonl", "config.yaml", "memory.json", "skipped.jsonl", "build.log", "hf", "hf.tmp",
             "hf.check_failed", "adapter", "checkpoints")


def check_output_dir(cfg) -> None:
    """A stage never writes over an earlier run by accident: an `output_dir` where a run took steps needs
    resume=true (continue it) or overwrite=true (start afresh; `start_afresh` clears it, keeping the tokenization
    cache). What a run that failed before its first step left does not block the same command again."""
    out = os.path.expanduser(cfg.output_dir)
    if cfg.resume or cfg.overwrite or not os.path.isdir(out):
        return
    found = earlier_work(out)
    if found:
        advice = ("resume=true continues it, overwrite=true replaces it" if "checkpoints" in found else
                  "it has no checkpoint to resume from (checkpoint_every), so overwrite=true replaces it")
        raise ConfigError(f"output_dir={cfg.output_dir} holds an earlier run ({', '.join(found)}): {advice}, "
                          f"or choose another output_dir")


def start_afresh(cfg) -> None:
    """Rank 0, before anything is written: overwrite=true removes an earlier run's files from output_dir; so does a
    fresh start over the leftovers of a run that never took a step (its config.yaml, build.log, skipped.jsonl)."""
    import shutil

    out = os.path.expanduser(cfg.output_dir)
    if cfg.resume or not os.path.isdir(out) or not (cfg.overwrite or not earlier_work(out)):
        return
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def stage_checks(cfg) -> None:
    """Everything a stage checks from its config alone, before torch.distributed starts (train/cli.py)."""
    validate(cfg)
    check_output_dir(cfg)
    check_resume(cfg)


def check_deepspeed_section(ds) -> None:
    """The `deepspeed:` section (the group deepspeed=zero0..3 and any `deepspeed.*` override), checked before
    anything loads: `zero_optimization` against DeepSpeed's own schema (which rejects an unknown key, but only
    inside `deepspeed.initialize`, after the model loaded), and every top-level key that is not one DeepSpeed
    defines but resembles one (a typo DeepSpeed would ignore silently: `zero_optimisation`)."""
    import difflib

    import deepspeed.runtime.constants as ds_constants
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    known = {v for k, v in vars(ds_constants).items() if k.isupper() and isinstance(v, str)}
    known |= {"zero_optimization", "expert_parallel", "sequence_parallel_size", "tensorboard", "wandb", "csv_monitor",
              "comet", "compile", "zenflow"}
    for key in ds:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        if key not in known and close:
            raise ConfigError(f"deepspeed.{key}: not a DeepSpeed key; did you mean deepspeed.{close[0]}?")
    zero = dict(ds.get("zero_optimization") or {})
    fields = set(DeepSpeedZeroConfig.model_fields) | {f.alias for f in DeepSpeedZeroConfig.model_fields.values() if f.alias}
    for key in zero:
        if key not in fields and not _zero_alias_accepted(DeepSpeedZeroConfig, key, zero[key]):
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
            raise ConfigError(f"deepspeed.zero_optimization.{key}: not a key of DeepSpeed's zero_optimization"
                              + (f"; did you mean {close[0]}?" if close else ""))


def _zero_alias_accepted(schema, key: str, value) -> bool:
    """Whether DeepSpeed's ZeRO schema takes `key` (deprecated names and aliases included) on its own."""
    try:
        schema(**{"stage": 0, key: value})
        return True
    except Exception:  # noqa: BLE001 - pydantic's ValidationError: an extra (forbidden) key, or a bad value
        return False
