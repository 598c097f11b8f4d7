"""Structured (dataclass) schemas for the stage configs, and the checks Hydra cannot express.

Every primary config (`configs/{pretrain,sft,dpo}.yaml`) starts from one of the schemas
registered here, so OmegaConf rejects an unknown key (`optim.lrr=1`) or a wrong type
(`max_steps=abc`) at composition, naming the key. `validate(cfg, world_size)` adds the
cross-key rules (expert parallel size, batch arithmetic, enumerations, combinations) and
raises `ConfigError` naming the key before any heavy work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


@dataclass
class ModelConfig:
    """Mixtral architecture with Hugging Face's key names, plus how to build it."""
    name: str = MISSING
    vocab_size: int = 32000
    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    head_dim: Optional[int] = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    # Context extension (continued pretraining at a longer length): replace the architecture's values, a
    # model_path's config.json included (the preset's own keys above apply only without model_path).
    rope_theta_override: Optional[float] = None
    max_position_embeddings_override: Optional[int] = None
    rms_norm_eps: float = 1e-5
    sliding_window: Optional[int] = None
    router_jitter_noise: float = 0.0
    router_aux_loss_coef: float = 0.02
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int = 2
    attn_implementation: str = "packed_sdpa"  # packed_sdpa (model/attention.py) | sdpa | eager | flash_attention_2 | flex_attention
    experts_implementation: str = "sorted_grouped_mm"  # sorted_grouped_mm (model/experts.py) | grouped_mm | batched_mm | eager
    gradient_checkpointing: bool = False
    tiled_mlp_tokens: int = 0         # > 0: MoE experts run in tiles of this many tokens (model/tiled_moe.py)


@dataclass
class OptimConfig:
    name: str = "adamw"               # adamw | sgd (plain SGD: debugging, gradient-scale checks)
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"          # cosine | linear | constant | wsd (constant, then linear over decay_fraction)
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2       # wsd: the last part of the steps (after warmup) that decays to min_lr_ratio
    grad_clip: float = 1.0


@dataclass
class RouterConfig:
    aux_loss_coef: float = 0.01       # Switch α on our per-layer loss (balanced = 1.0); HF c ≈ ours / top_k
    z_loss_coef: float = 0.0          # ST-MoE uses 1e-3
    global_batch: bool = False        # f_e over the global batch (micro-batches × DP ranks)


@dataclass
class DataConfig:
    path: str = "synthetic"           # file, folder, hub dataset name, or "synthetic" (project-generated)
    format: str = "auto"              # auto|text|messages|alpaca|sharegpt|preference|hh_rlhf
    split: str = "train"
    name: Optional[str] = None        # hub dataset config name
    text_field: str = "text"
    packing: bool = True
    overlong: str = "truncate"        # truncate | drop
    on_error: str = "raise"           # raise | skip
    dedup: bool = True                # drop exact duplicate records (counted, listed in skipped.jsonl)
    max_record_chars: int = 1_000_000 # a longer line/record is an error (a broken export, not a sample)
    max_samples: Optional[int] = None
    synthetic_samples: int = 2000
    synthetic_passkey_share: float = 0.1  # share of synthetic pretraining documents that are passkey documents,
    synthetic_passkey_filler: int = 3     # holding 0..this many filler units (data/synthetic.py: pretrain_texts)
    num_proc: int = 1
    cache_dir: Optional[str] = None   # tokenization cache; default <output_dir>/cache


@dataclass
class LoggingConfig:
    backend: str = "none"             # none | wandb
    project: str = "mixtral-tune"
    run_name: Optional[str] = None
    mode: str = "offline"             # wandb mode: offline | online | disabled
    log_every: int = 1
    heatmap_every: int = 50
    dead_expert_steps: int = 20       # warn when an expert gets no token for this many steps


@dataclass
class PlanConfig:
    enforce: bool = True              # refuse, before loading, a layout train/plan.py says does not fit a rank's memory


@dataclass
class HubConfig:
    repo_id: Optional[str] = None     # push the export (hf/) to this Hugging Face Hub repository when set
    private: bool = True


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    experts: bool = False             # also adapt the fused expert weights (peft target_parameters)
    train_router: bool = False


@dataclass
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"        # sigmoid | ipo | hinge | robust
    label_smoothing: float = 0.0
    sft_weight: float = 0.0           # RPO-style NLL on chosen
    dpop_lambda: float = 0.0          # DPOP: λ·max(0, log π_ref(y_w) − log π(y_w)) taken off the margin
    mask_common_suffix: bool = False  # leave the answers' shared ending (". </s>") out of both log-probs (collate)
    reference: str = "precomputed"    # precomputed | live | adapters_off (LoRA)
    max_prompt_len: Optional[int] = None


@dataclass
class StageConfig:
    stage: str = MISSING
    output_dir: str = MISSING
    max_steps: int = 100
    seed: int = 0
    model_path: Optional[str] = None
    model: ModelConfig = MISSING
    deepspeed: dict[str, Any] = field(default_factory=dict)
    expert_parallel_size: int = 1
    sequence_parallel_size: int = 1   # ranks sharing each row's tokens (Ulysses, train/sequence_parallel.py)
    global_batch_size: int = 8
    micro_batch_size: int = 1
    max_seq_len: int = 512
    precision: str = "auto"           # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    optim: OptimConfig = field(default_factory=OptimConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    checkpoint_every: int = 0         # 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = False
    export: bool = True
    verify_export: bool = True        # compare the export's logits with the live model's on a probe batch
    dist_timeout_s: int = 300         # collective timeout, and how long a silent peer rank is waited for
    max_bad_steps: int = 5            # stop (after a checkpoint) when this many steps in a row are non-finite
    plan: PlanConfig = field(default_factory=PlanConfig)
    overwrite: bool = False           # start afresh in a non-empty output_dir (its tokenization cache is kept)
    hub: HubConfig = field(default_factory=HubConfig)
    recipe_name: Optional[str] = None  # set from the command line's recipe= (recorded in config.yaml)


@dataclass
class PretrainConfig(StageConfig):
    stage: str = "pretrain"


@dataclass
class SFTConfig(StageConfig):
    stage: str = "sft"


@dataclass
class DPOStageConfig(StageConfig):
    stage: str = "dpo"
    dpo: DPOConfig = field(default_factory=DPOConfig)
    allow_random_init: bool = False   # DPO a randomly initialised preset instead of a model_path (tests only)


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=PretrainConfig)
    cs.store(name="sft_schema", node=SFTConfig)
    cs.store(name="dpo_schema", node=DPOStageConfig)


register_schemas()

DATA_FORMATS = ("auto", "text", "messages", "alpaca", "sharegpt", "preference", "hh_rlhf")


def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, allowed))}")


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
    _one_of("precision", cfg.precision, ("auto", "fp32", "bf16", "fp16"))
    _one_of("model.attn_implementation", m.attn_implementation, ("packed_sdpa", "sdpa", "eager", "flash_attention_2", "flex_attention"))
    _one_of("model.experts_implementation", m.experts_implementation, ("sorted_grouped_mm", "grouped_mm", "batched_mm", "eager"))
    _one_of("optim.name", cfg.optim.name, ("adamw", "sgd"))
    _one_of("optim.schedule", cfg.optim.schedule, ("cosine", "linear", "constant", "wsd"))
    if not 0.0 < cfg.optim.decay_fraction <= 1.0:
        raise ConfigError(f"optim.decay_fraction={cfg.optim.decay_fraction}: expected a share in (0, 1]")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas={list(cfg.optim.betas)}: expected two values")
    _one_of("data.format", cfg.data.format, DATA_FORMATS)
    _one_of("data.overlong", cfg.data.overlong, ("truncate", "drop"))
    share = cfg.data.synthetic_passkey_share
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"data.synthetic_passkey_share={share}: expected a share between 0 and 1")
    if cfg.data.synthetic_passkey_filler < 0:
        raise ConfigError(f"data.synthetic_passkey_filler={cfg.data.synthetic_passkey_filler}: expected >= 0")
    _one_of("data.on_error", cfg.data.on_error, ("raise", "skip"))
    if cfg.data.max_record_chars < 1:
        raise ConfigError(f"data.max_record_chars={cfg.data.max_record_chars}: must be >= 1")
    _one_of("logging.backend", cfg.logging.backend, ("none", "wandb"))
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
    if cfg.lora.enabled and cfg.expert_parallel_size > 1:
        raise ConfigError("lora.enabled=true with expert_parallel_size>1: with every expert frozen, DeepSpeed's ZeRO "
                          "optimizers find no trainable MoE parameter group under AutoEP and refuse to start; "
                          "use expert_parallel_size=1 with deepspeed=zero3 to shard the frozen base instead")
    if cfg.lora.enabled and cfg.lora.experts and stage == 3:
        raise ConfigError("lora.experts=true with ZeRO-3: expert adapters are merged by peft, which needs the full "
                          "expert weights in place; use deepspeed=zero2, or attention-only adapters (lora.experts=false)")
    if hasattr(cfg, "dpo"):
        _one_of("dpo.loss_type", cfg.dpo.loss_type, ("sigmoid", "ipo", "hinge", "robust"))
        _one_of("dpo.reference", cfg.dpo.reference, ("precomputed", "live", "adapters_off"))
        if cfg.dpo.reference == "adapters_off" and not cfg.lora.enabled:
            raise ConfigError("dpo.reference=adapters_off needs lora.enabled=true")
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


RUN_FILES = ("metrics.jsonl", "config.yaml", "memory.json", "skipped.jsonl", "hf", "hf.tmp", "adapter", "checkpoints")


def check_output_dir(cfg) -> None:
    """A stage never writes over an earlier run by accident: a non-empty `output_dir` needs resume=true
    (continue it) or overwrite=true (start afresh; `start_afresh` clears it, keeping the tokenization cache)."""
    out = os.path.expanduser(cfg.output_dir)
    if cfg.resume or cfg.overwrite or not os.path.isdir(out):
        return
    found = sorted(name for name in os.listdir(out) if name in RUN_FILES)
    if found:
        raise ConfigError(f"output_dir={cfg.output_dir} holds an earlier run ({', '.join(found)}): resume=true continues "
                          f"it, overwrite=true replaces it, or choose another output_dir")


def start_afresh(cfg) -> None:
    """overwrite=true: remove an earlier run's files from output_dir (rank 0, before anything is written)."""
    import shutil

    out = os.path.expanduser(cfg.output_dir)
    if not cfg.overwrite or cfg.resume or not os.path.isdir(out):
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


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def compose(stage: str, overrides: list[str] | None = None):
    """Compose a stage config the way `train/<stage>.py` does, without running Hydra's app
    (for tests, the pipeline and notebooks). Raises on unknown keys or wrong types."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name=stage, overrides=list(overrides or []))


@dataclass
class PipelineStage:
    recipe: str = MISSING
    max_steps: int = MISSING
    overrides: list[str] = field(default_factory=list)   # extra key=value for the stage command


@dataclass
class PipelineMTBench:
    questions: Optional[str] = None      # FastChat question.jsonl; answers are generated when set
    max_new_tokens: int = 64
    limit: Optional[int] = None
    judge_base_url: Optional[str] = None
    judge_model: str = "gpt-4"
    judge_api_key_env: str = "OPENAI_API_KEY"


@dataclass
class PipelineConfig:
    output_dir: str = "outputs/pipeline"
    force: bool = False                  # redo stages that already finished
    nproc: int = 2                       # torchrun --nproc_per_node for every stage
    model: str = "tiny"
    seed: int = 0
    # What made the tiny model learn in minutes (measured; see data/synthetic.py and README): one-line
    # pretraining documents, 400 steps × 16 rows at a constant lr with a linear decay over the last 20%
    # (wsd; 200 steps recalled 60/100 sums, 400 recall 100/100; the decay lifted the weakest of three seeds'
    # SFT exact match 83% → 94%); then LoRA on attention for SFT, which teaches the [INST] format without
    # overwriting the facts stored in the experts (full SFT: held-out exact match 73%, LoRA: 94%); then DPO
    # through LoRA adapters on attention AND experts (8 pairs per step, lr 3e-4; full DPO lowered each
    # rejected capital where it trained on it and barely elsewhere). DPO leaves out the ending both answers
    # share (dpo.mask_common_suffix: plain DPO lowered the ". </s>" after every answer, exact match 86% → 62%),
    # at β 2 (held-out reward accuracy over three pretraining seeds: β 0.5 87.7-92.0%, β 1 89.0-92.5%, β 2
    # 91.0-93.2%; README, "What made the difference").
    pretrain: PipelineStage = field(default_factory=lambda: PipelineStage(
        recipe="tiny/pretrain", max_steps=400, overrides=["micro_batch_size=8", "global_batch_size=16",
                                                          "optim.schedule=wsd", "data.synthetic_samples=20000"]))
    sft: PipelineStage = field(default_factory=lambda: PipelineStage(
        recipe="tiny/sft", max_steps=80, overrides=["lora.enabled=true", "lora.r=16", "lora.alpha=32", "lora.dropout=0.0",
                                                     "optim.lr=3e-3", "optim.schedule=constant"]))
    dpo: PipelineStage = field(default_factory=lambda: PipelineStage(
        recipe="tiny/dpo", max_steps=120, overrides=["lora.enabled=true", "lora.experts=true", "lora.r=16", "lora.alpha=32",
                                                     "lora.dropout=0.0", "optim.lr=3e-4", "data.synthetic_samples=1000",
                                                     "global_batch_size=8", "dpo.beta=2.0", "dpo.mask_common_suffix=true"]))
    heldout: int = 100                   # held-out prompts / documents per measurement
    # held-out preference pairs: forward passes only, so many. Half are capitals over only 8 held-out
    # countries, and 50 of them measured 70% where 200 measured 84.5% (same model): the draw of countries
    heldout_pairs: int = 400
    passkey_lengths: list[int] = field(default_factory=lambda: [128, 256])
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = 5
    mt_bench: PipelineMTBench = field(default_factory=PipelineMTBench)


ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)
